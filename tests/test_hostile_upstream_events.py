"""Odd upstream answers: a stream's valid but unexpected events are relayed as they are, never
cached, never a crash; a whole answer that cannot be replayed as a stream is a ValueError."""

import json
import logging

import pytest
import requests

from app.cache.replay import replay_events
from tests.conftest import live_server, provider
from tests.upstream import Stream, chat_chunks

CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}], "stream": True}

# Each is valid JSON that no OpenAI stream carries, or carries in another shape.
ODD_EVENTS = [
    b"[1,2,3]",
    b"null",
    b'"text"',
    b"42",
    b'{"choices": 5}',
    b'{"choices": [5]}',
    b'{"choices": [null]}',
    b'{"choices": [{"delta": "x"}]}',
    b'{"choices": [{"index": [1], "delta": {}}]}',
    b'{"choices": [{"index": {"a": 1}, "delta": {}}]}',
    b'{"choices": [{"index": "0", "delta": {"content": "a"}, "finish_reason": "stop"}]}',
    b'{"choices": [{"index": 1.5, "delta": {}, "finish_reason": "stop"}]}',
    b'{"choices": [{"delta": {"content": 5}}]}',
    b'{"choices": [{"delta": {"content": ["a"]}}]}',
    b'{"choices": [{"delta": {"tool_calls": 5}}]}',
    b'{"choices": [{"delta": {"tool_calls": [5]}}]}',
    b'{"choices": [{"delta": {"tool_calls": [{"index": [0], "function": {}}]}}]}',
    b'{"choices": [{"delta": {"tool_calls": [{"function": "f"}]}}]}',
    b'{"choices": [{"delta": {"tool_calls": [{"function": {"name": 5, "arguments": []}}]}}]}',
    b'{"choices": [{"delta": {}, "finish_reason": ["stop"]}]}',
    b'{"choices": [], "usage": 5}',
    b'{"choices": [], "usage": [1]}',
    b'{"choices": [], "id": ' + b"[" * 300 + b"]" * 300 + b"}",
]


@pytest.fixture
def app(make_app, upstream):
    return make_app([provider(upstream.url)], cache={"enabled": True})


def normal_events_around(odd: list) -> list:
    """A normal chat stream with ``odd`` events after its first chunk; ends with [DONE]."""
    chunks = chat_chunks("gpt-test", ["Hello", " there"])
    return chunks[:1] + odd + chunks[1:]


def payloads(events: list) -> list[bytes]:
    """What the client should see after ``data: ``, for what the fake upstream sends."""
    return [e if isinstance(e, bytes) else json.dumps(e).encode() for e in events]


def received(response) -> list[bytes]:
    return [e[len(b"data: "):] for e in response.content.split(b"\n\n") if e]


def stream_twice(app, upstream, events, caplog):
    """Two identical streaming requests through a live server; both upstream answers are
    ``events``. Returns both responses; fails if anything logged an exception."""
    upstream.script(Stream(events), Stream(events))
    with caplog.at_level(logging.DEBUG), live_server(app) as url:
        first = requests.post(url + "/v1/chat/completions", json=CHAT, timeout=5)
        second = requests.post(url + "/v1/chat/completions", json=CHAT, timeout=5)
    crashes = [r for r in caplog.records if r.exc_info or "Exception" in r.getMessage()]
    assert not crashes, [r.getMessage() for r in crashes]
    return first, second


@pytest.mark.parametrize("odd", ODD_EVENTS, ids=lambda e: e.decode()[:60])
def test_an_odd_event_is_relayed_unchanged_and_the_answer_is_not_cached(app, upstream, caplog,
                                                                         odd):
    events = normal_events_around([odd])
    first, second = stream_twice(app, upstream, events, caplog)
    for response in (first, second):
        assert response.status_code == 200
        assert received(response) == payloads(events)
        assert response.headers["X-Cache"] == "MISS"
    assert upstream.calls == 2


def test_many_odd_events_mixed_with_normal_ones_reach_the_client_in_order(app, upstream, caplog):
    events = normal_events_around(ODD_EVENTS)
    first, second = stream_twice(app, upstream, events, caplog)
    assert first.status_code == second.status_code == 200
    assert received(first) == received(second) == payloads(events)
    assert received(first)[-1] == b"[DONE]"
    assert second.headers["X-Cache"] == "MISS" and upstream.calls == 2



NORMAL_CHOICE = {"index": 0, "message": {"role": "assistant", "content": "hi"},
                 "finish_reason": "stop"}
UNREPLAYABLE = [
    b"[1,2,3]",
    b"null",
    b'"text"',
    b'{"choices": 5}',
    b'{"choices": [5]}',
    b'{"choices": [{"message": "x"}]}',
    b'{"choices": [{"message": {"tool_calls": 5}}]}',
    b'{"choices": [{"message": {"tool_calls": [5]}}]}',
    b'{"choices": [{"message": {"content": ' + b"[" * 300 + b"]" * 300 + b"}}]}",
]


@pytest.mark.parametrize("answer", UNREPLAYABLE, ids=lambda a: a.decode()[:50])
def test_an_answer_that_cannot_be_replayed_is_a_value_error_before_any_event(answer):
    events = replay_events("chat", answer, include_usage=True)
    with pytest.raises(ValueError):
        next(events)


def test_a_replayed_answer_leaves_out_a_usage_that_is_not_an_object():
    answer = json.dumps({"id": "c1", "choices": [NORMAL_CHOICE], "usage": 5}).encode()
    events = list(replay_events("chat", answer, include_usage=True))
    assert events[-1] == b"data: [DONE]\n\n"
    chunks = [json.loads(e[len(b"data: "):]) for e in events[:-1]]
    assert [c["choices"][0]["delta"] for c in chunks] == [{"role": "assistant", "content": "hi"},
                                                          {}]
    assert all("usage" not in c for c in chunks)
