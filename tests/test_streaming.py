"""Streaming: SSE relayed as produced, fallback before the first byte, an error event after it."""

import json
import socket
import threading

import pytest
import requests

from tests.conftest import live_server, provider
from tests.upstream import Reply, Reset, Stream, chat_chunks

CHAT = {"model": "gpt-test", "stream": True, "messages": [{"role": "user", "content": "hi"}]}


def events_of(body: bytes):
    return [e[len(b"data: "):] for e in body.split(b"\n\n") if e]


@pytest.fixture
def two(make_app, upstream, upstream_b):
    return make_app([provider(upstream.url, "a", priority=1),
                     provider(upstream_b.url, "b", priority=2)],
                    http_client={"retry_attempts": 0, "timeout": 1.0})


def test_a_stream_is_relayed_event_by_event_ending_with_done(two):
    response = two.test_client().post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 200
    assert response.mimetype == "text/event-stream"
    events = events_of(response.data)
    assert events[-1] == b"[DONE]"
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert text == "Hello from upstream"
    assert response.headers["X-Proxy-Provider"] == "a"


def test_chunks_reach_the_client_before_the_upstream_has_finished(make_app, upstream):
    """The proxy never buffers: the first event arrives while the upstream still holds the rest."""
    gate = threading.Event()
    upstream.script(Stream(chat_chunks("gpt-test", ["first", " second"]), gate=gate))
    app = make_app([provider(upstream.url)])
    with live_server(app) as url:
        with requests.post(url + "/v1/chat/completions", json=CHAT, stream=True,
                           timeout=5) as response:
            lines = response.iter_lines()
            first = next(line for line in lines if line)
            assert b'"first"' in first
            gate.set()  # only now may the upstream send the rest
            rest = [line for line in lines if line]
    assert rest[-1] == b"data: [DONE]"


@pytest.mark.parametrize("failure", [
    Reply(503, {"error": {"message": "overloaded"}}),
    Reset(),
    Stream([], cut_after=0),
    Stream([b"[DONE]"]),
], ids=["503", "reset", "cut-before-first-event", "empty-stream"])
def test_a_failure_before_the_first_byte_falls_back(two, upstream, upstream_b, failure):
    upstream.script(failure)
    response = two.test_client().post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 200
    assert response.headers["X-Proxy-Provider"] == "b"
    assert events_of(response.data)[-1] == b"[DONE]"
    assert upstream_b.calls == 1


@pytest.mark.parametrize("failure", [
    Stream(chat_chunks("gpt-test", ["Hel", "lo", "!"]), cut_after=2),
    Stream(chat_chunks("gpt-test", ["Hel", "lo"], done=False)[:2]),
], ids=["reset-mid-stream", "ends-without-finish"])
def test_a_failure_after_the_first_byte_ends_with_an_error_event(two, upstream_b, upstream, failure):
    upstream.script(failure)
    response = two.test_client().post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 200
    events = events_of(response.data)
    error = json.loads(events[-1])["error"]
    assert error["type"] == "upstream_error"
    assert "provider a" in error["message"]
    assert b"[DONE]" not in events
    assert upstream_b.calls == 0  # the client already has part of a's answer


def test_a_stream_without_done_but_finished_is_completed(make_app, upstream):
    upstream.script(Stream(chat_chunks("gpt-test", ["ok"], done=False)))
    app = make_app([provider(upstream.url)])
    events = events_of(app.test_client().post("/v1/chat/completions", json=CHAT).data)
    assert events[-1] == b"[DONE]"
    assert all(b"error" not in e for e in events)


def test_a_read_timeout_mid_stream_ends_with_an_error_event(make_app, upstream):
    upstream.script(Stream(chat_chunks("gpt-test", ["a", "b"]), delay=2.0))
    app = make_app([provider(upstream.url)], http_client={"timeout": 0.3, "retry_attempts": 0})
    events = events_of(app.test_client().post("/v1/chat/completions", json=CHAT).data)
    assert json.loads(events[-1])["error"]["code"] == "upstream_timeout"


def test_a_client_disconnect_closes_the_upstream_stream(make_app, upstream):
    upstream.script(Stream(chat_chunks("gpt-test", ["tick"] * 200), delay=0.02))
    app = make_app([provider(upstream.url)])
    with live_server(app) as url:
        host, port = url.removeprefix("http://").split(":")
        body = json.dumps(CHAT).encode()
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(body), body))
            assert b"tick" in sock.recv(65536) or b"tick" in sock.recv(65536)
        assert upstream.aborted.wait(3), "the proxy kept reading from the upstream"


def test_streamed_legacy_completions(make_app, upstream):
    app = make_app([provider(upstream.url)])
    body = {"model": "gpt-test", "prompt": "hi", "stream": True}
    events = events_of(app.test_client().post("/v1/completions", json=body).data)
    assert events[-1] == b"[DONE]"
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == "Hello there"


def test_mock_provider_streams_its_configured_chunk_count(make_app):
    app = make_app([{"name": "mock", "type": "mock", "models": ["m"], "chunks": 3}])
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    events = events_of(app.test_client().post("/v1/chat/completions", json=body).data)
    assert len(events) == 4 and events[-1] == b"[DONE]"


def test_a_stream_dropped_without_close_frees_its_slots_by_the_next_request(make_app, upstream):
    """Settling takes locks, so a relay that was never closed is settled on the next request,
    never from a finalizer (which could run inside code holding those locks)."""
    import gc
    app = make_app([provider(upstream.url)])
    llm_proxy = app.extensions["llm_proxy"]
    relay = app.test_client().post("/v1/chat/completions", json=CHAT).response
    next(iter(relay))  # the stream has begun: its slots are held
    assert llm_proxy.admission.in_flight == 1 and llm_proxy.bulkheads["up"].in_flight == 1
    del relay
    gc.collect()
    assert llm_proxy.admission.in_flight == 1  # not settled from the finalizer...
    app.test_client().post("/v1/chat/completions", json=CHAT).close()
    assert llm_proxy.admission.in_flight == 0  # ...but by the next request
    assert llm_proxy.bulkheads["up"].in_flight == 0


def test_a_provider_full_of_streams_answers_503_provider_full_with_retry_after(make_app, upstream):
    """A healthy provider at its limit of calls in flight is full, not absent: the client is told
    so (``provider_full``), with Retry-After, while the held stream goes on."""
    gate = threading.Event()
    upstream.script(Stream(chat_chunks("gpt-test", ["first", " second"]), gate=gate))
    app = make_app([provider(upstream.url, max_in_flight=1)])
    with live_server(app) as url:
        with requests.post(url + "/v1/chat/completions", json=CHAT, stream=True,
                           timeout=5) as held:
            lines = held.iter_lines()
            assert b'"first"' in next(line for line in lines if line)
            refused = requests.post(url + "/v1/chat/completions", json=CHAT, timeout=5)
            gate.set()
            rest = [line for line in lines if line]
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "provider_full"
    assert "at its limit of 1 requests in flight" in refused.json()["error"]["message"]
    assert refused.headers["Retry-After"] == "1"
    assert rest[-1] == b"data: [DONE]"
    assert upstream.calls == 1



def test_a_stream_ended_by_done_leaves_its_upstream_connection_to_the_next_request(
        make_app, upstream):
    """After ``[DONE]`` the rest of the upstream's body (its last chunk) is read, so the
    connection goes back to the pool: a second stream reuses it instead of connecting again
    (for a TLS provider, a handshake a stream)."""
    upstream.script(Stream(chat_chunks("gpt-test", ["one"])), Stream(chat_chunks("gpt-test", ["two"])))
    app = make_app([provider(upstream.url)])
    client = app.test_client()
    for _ in range(2):
        assert events_of(client.post("/v1/chat/completions", json=CHAT).data)[-1] == b"[DONE]"
    assert len({r.client_port for r in upstream.requests}) == 1
