"""Hostile and broken upstreams: bombs, giant and dripping bodies, endless and boundless
streams, redirects, JSON where SSE was asked, long silences. Each case gets a clear error (or
the SSE error event mid-stream) within a bounded time and memory, and the proxy goes on."""

from __future__ import annotations

import itertools
import json
import socket
import threading
import time
import zlib

import psutil
import pytest

from tests.anthropic_upstream import message, reply
from tests.conftest import live_server, provider
from tests.upstream import Body, Reply, Stream, chat_chunks, chat_completion

CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}
STREAM = {**CHAT, "stream": True}
MB = 1024 * 1024


class PeakRss:
    """The highest RSS of this process (the app is in it) while the block runs."""

    def __init__(self):
        self.process = psutil.Process()
        self.stop = threading.Event()

    def __enter__(self):
        self.before = self.peak = self.process.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.stop.wait(0.005):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=2)

    @property
    def growth_mb(self):
        return (self.peak - self.before) / MB


def gzip_bomb(inflated_mb):
    """A gzip body of ``inflated_mb`` MB of zeros, compressed about a thousand to one."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = bytes(MB)
    parts = [packer.compress(zeros) for _ in range(inflated_mb)]
    return b"".join(parts) + packer.flush()


def post(app, body=CHAT):
    return app.test_client().post("/v1/chat/completions", json=body)


def error_of(response):
    data = response.get_json()
    assert set(data["error"]) == {"message", "type", "param", "code"}
    return data["error"]


def sse_events(body: bytes) -> list[bytes]:
    return [e for e in body.split(b"\n\n") if e]


def assert_alive(app):
    assert app.test_client().get("/health/live").status_code == 200


@pytest.fixture(scope="module")
def bomb():
    return gzip_bomb(300)


def test_a_gzip_bomb_is_a_502_naming_the_limit_in_bounded_memory(make_app, upstream, bomb):
    upstream.script(Reply(raw=bomb, headers={"Content-Encoding": "gzip"}))
    app = make_app([provider(upstream.url)], http_client={"max_response_mb": 8})
    with PeakRss() as rss:
        response = post(app)
    assert response.status_code == 502
    assert "max_response_mb" in error_of(response)["message"]
    assert rss.growth_mb < 64, f"{rss.growth_mb:.0f} MB for a 300 MB bomb"
    assert_alive(app)


def test_a_giant_plain_body_is_a_502_read_no_further_than_the_limit(make_app, upstream):
    piece = b"x" * 65536
    upstream.script(Body(itertools.repeat(piece, 300 * 16), length=300 * MB))
    app = make_app([provider(upstream.url)], http_client={"max_response_mb": 8})
    with PeakRss() as rss:
        started = time.monotonic()
        response = post(app)
    assert response.status_code == 502 and "8 MB" in error_of(response)["message"]
    assert rss.growth_mb < 64 and time.monotonic() - started < 5
    assert upstream.aborted.wait(5) and upstream.sent < 50 * MB  # the proxy hung up
    assert_alive(app)


def test_a_bomb_falls_back_to_the_next_provider_and_counts_as_its_failure(
        make_app, upstream, upstream_b, bomb):
    upstream.script(Reply(raw=bomb, headers={"Content-Encoding": "gzip"}))
    app = make_app([provider(upstream.url, priority=1),
                    provider(upstream_b.url, name="b", priority=2)],
                   http_client={"max_response_mb": 8})
    response = post(app)
    assert response.status_code == 200 and response.headers["X-Proxy-Provider"] == "b"
    metrics = app.test_client().get("/metrics").get_data(as_text=True)
    assert 'llm_proxy_upstream_errors_total{kind="too_large",provider="up"} 1.0' in metrics


def test_a_dripping_whole_answer_obeys_the_deadline(make_app, upstream):
    answer = json.dumps(chat_completion("gpt-test", "slow")).encode()
    upstream.script(Body((bytes([b]) for b in answer), length=len(answer), delay=0.1))
    app = make_app([provider(upstream.url)], http_client={"deadline": 1.0})
    started = time.monotonic()
    response = post(app)
    assert response.status_code == 504 and "deadline" in error_of(response)["message"]
    assert time.monotonic() - started < 2.5


def endless_events():
    chunk = json.dumps(chat_chunks("gpt-test", ["tick"])[0]).encode()
    return (b"data: " + chunk + b"\n\n" for _ in itertools.count())


def test_an_endless_stream_ends_with_an_error_event_at_its_maximum_duration(make_app, upstream):
    upstream.script(Body(endless_events(), headers={"Content-Type": "text/event-stream"},
                         delay=0.01))
    app = make_app([provider(upstream.url)], streaming={"max_duration": 1.0})
    started = time.monotonic()
    response = post(app, STREAM)
    events = sse_events(response.get_data())
    assert time.monotonic() - started < 3
    assert response.status_code == 200 and len(events) > 5
    error = json.loads(events[-1][6:])["error"]
    assert error["code"] == "upstream_timeout" and "max_duration" in error["message"]
    assert upstream.aborted.wait(5)  # the upstream connection was closed


def test_a_stream_without_event_boundaries_is_refused_in_linear_time(make_app, upstream):
    piece = b"data: " + b"x" * 65530
    upstream.script(Body(itertools.repeat(piece, 100 * 16),
                         headers={"Content-Type": "text/event-stream"}))
    app = make_app([provider(upstream.url)], streaming={"max_event_kb": 1024})
    cpu, started = time.process_time(), time.monotonic()
    response = post(app, STREAM)
    assert response.status_code == 502 and "max_event_kb" in error_of(response)["message"]
    assert time.process_time() - cpu < 2 and time.monotonic() - started < 3
    assert upstream.aborted.wait(5) and upstream.sent < 20 * MB
    assert_alive(app)


def test_an_event_past_the_limit_after_the_first_ends_the_stream_with_an_error_event(
        make_app, upstream):
    first = json.dumps(chat_chunks("gpt-test", ["hi"])[0]).encode()
    pieces = itertools.chain([b"data: " + first + b"\n\n"], itertools.repeat(b"y" * 65536, 64))
    upstream.script(Body(pieces, headers={"Content-Type": "text/event-stream"}))
    app = make_app([provider(upstream.url)], streaming={"max_event_kb": 256})
    events = sse_events(post(app, STREAM).get_data())
    assert events[0] == b"data: " + first
    assert json.loads(events[-1][6:])["error"]["code"] == "upstream_error"


def test_bytes_dripping_without_an_event_hit_the_idle_timeout(make_app, upstream):
    first = json.dumps(chat_chunks("gpt-test", ["hi"])[0]).encode()
    pieces = itertools.chain([b"data: " + first + b"\n\n"], itertools.repeat(b"z", 1000))
    upstream.script(Body(pieces, headers={"Content-Type": "text/event-stream"}, delay=0.05))
    app = make_app([provider(upstream.url)], streaming={"idle_timeout": 0.6})
    started = time.monotonic()
    events = sse_events(post(app, STREAM).get_data())
    assert time.monotonic() - started < 3
    error = json.loads(events[-1][6:])["error"]
    assert error["code"] == "upstream_timeout" and "idle_timeout" in error["message"]


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_a_redirect_is_a_provider_failure_never_followed(make_app, upstream, upstream_b, status):
    upstream.script(Reply(status=status, headers={"Location": upstream_b.url + "/steal"}),
                    Reply(status=status, headers={"Location": upstream_b.url + "/steal"}))
    app = make_app([provider(upstream.url, priority=1),
                    provider(upstream_b.url, name="b", priority=2)])
    assert post(app).headers["X-Proxy-Provider"] == "b"
    assert post(app, STREAM).headers["X-Proxy-Provider"] == "b"
    assert upstream.calls == 2 and all(r.path == "/v1/chat/completions"
                                       for r in upstream_b.requests)
    assert app.test_client().get("/providers").get_json()["providers"][0]["circuit_breaker"]["failures"] == 2


def test_a_redirect_from_the_only_provider_is_a_502(make_app, upstream):
    upstream.script(Reply(status=301, headers={"Location": "http://127.0.0.1:1/"}))
    response = post(make_app([provider(upstream.url)]))
    assert response.status_code == 502 and "redirect" in error_of(response)["message"]
    assert "Location" not in response.headers


@pytest.mark.parametrize("include_usage", [False, True])
def test_json_answering_a_stream_request_is_replayed_as_sse(make_app, upstream, include_usage):
    upstream.script(Reply(body=chat_completion("gpt-test", "whole answer")))
    app = make_app([provider(upstream.url)])
    body = {**STREAM, "stream_options": {"include_usage": include_usage}}
    response = post(app, body)
    events = sse_events(response.get_data())
    assert response.status_code == 200 and response.mimetype == "text/event-stream"
    assert events[-1] == b"data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "whole answer"
    assert any(c.get("usage") for c in chunks) is include_usage


def test_json_that_is_no_answer_for_a_stream_falls_back(make_app, upstream, upstream_b):
    upstream.script(Reply(body={"status": "queued"}))
    app = make_app([provider(upstream.url, priority=1),
                    provider(upstream_b.url, name="b", priority=2)])
    response = post(app, STREAM)
    assert response.headers["X-Proxy-Provider"] == "b"
    assert sse_events(response.get_data())[-1] == b"data: [DONE]"


def test_an_anthropic_message_answering_a_stream_request_is_replayed(make_app, upstream):
    upstream.script(reply(message("Hello from Claude")))
    app = make_app([{"name": "claude", "type": "anthropic", "base_url": upstream.url,
                     "models": ["claude-test"]}])
    response = app.test_client().post("/v1/chat/completions", json={
        **STREAM, "model": "claude-test"})
    chunks = [json.loads(e[6:]) for e in sse_events(response.get_data())[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == \
        "Hello from Claude"


def test_a_quiet_stream_sends_keepalive_comments(make_app, upstream):
    upstream.script(Stream(chat_chunks("gpt-test", ["a", "b"]), delay=0.7))
    app = make_app([provider(upstream.url)], streaming={"keepalive_interval": 0.2})
    events = sse_events(post(app, STREAM).get_data())
    assert events[-1] == b"data: [DONE]"
    data = [e for e in events if e.startswith(b"data: ")]
    assert len(data) == 4 and b"".join(data).count(b'"content"') == 2
    keepalives = [i for i, e in enumerate(events) if e == b": keepalive"]
    assert len(keepalives) >= 4  # three quiet gaps of 0.7 s, 0.2 s apart


def test_silence_before_the_first_event_sends_keepalives_then_the_answer(make_app, upstream):
    def thinks_then_answers():
        threading.Event().wait(1.0)  # a model thinking before its first token
        for chunk in chat_chunks("gpt-test", ["late"]):
            yield b"data: " + (chunk if isinstance(chunk, bytes) else json.dumps(chunk).encode())
            yield b"\n\n"

    upstream.script(Body(thinks_then_answers(), headers={"Content-Type": "text/event-stream"}))
    app = make_app([provider(upstream.url)], streaming={"keepalive_interval": 0.2})
    events = sse_events(post(app, STREAM).get_data())
    assert events[0] == b": keepalive" and events[-1] == b"data: [DONE]"
    assert b'"late"' in b"".join(events)


def test_keepalives_can_be_turned_off(make_app, upstream):
    upstream.script(Stream(chat_chunks("gpt-test", ["a", "b"]), delay=0.5))
    app = make_app([provider(upstream.url)], streaming={"keepalive_interval": 0})
    assert b"keepalive" not in post(app, STREAM).get_data()


def test_a_client_that_leaves_a_quiet_stream_frees_its_slot_at_once(make_app, upstream):
    upstream.script(Stream(chat_chunks("gpt-test", ["a", "b"]), delay=10))
    app = make_app([provider(upstream.url)])
    with live_server(app) as url:
        body = json.dumps(STREAM).encode()
        client = socket.create_connection(url.removeprefix("http://").split(":"), timeout=5)
        client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d"
                       b"\r\n\r\n%s" % (len(body), body))
        assert client.recv(65536).startswith(b"HTTP/1.1 200")  # the stream has begun
        client.close()  # and the upstream then goes quiet
        deadline = time.monotonic() + 4  # noticed within a quiet tick, not after 10 s

        def in_flight():
            return app.test_client().get("/providers").get_json()["providers"][0]["in_flight"]

        while in_flight() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert in_flight() == 0


def test_an_anthropic_tool_input_nested_too_deep_to_write_back_is_a_502(make_app, upstream):
    deep = {}
    for _ in range(300):
        deep = {"x": deep}
    answer = message(("toolu_1", "f", {}), stop_reason="tool_use").model_dump(mode="json")
    answer["content"][0]["input"] = deep
    upstream.script(Reply(raw=json.dumps(answer).encode()))
    app = make_app([{"name": "claude", "type": "anthropic", "base_url": upstream.url,
                     "models": ["claude-test"]}])
    response = app.test_client().post("/v1/chat/completions", json={**CHAT, "model": "claude-test"})
    assert response.status_code == 502 and "written back" in error_of(response)["message"]


def test_a_provider_key_echoed_by_the_upstream_never_reaches_the_client(
        make_app, upstream, monkeypatch):
    secret = "sk-provider-secret-0123456789"
    monkeypatch.setenv("UP_KEY", secret)
    echo = f"you sent {secret}, and {secret}"
    upstream.script(
        Reply(status=400, body={"error": {"message": echo, "type": "invalid_request_error"}}),
        Reply(body=chat_completion("gpt-test", echo)),
        Stream(chat_chunks("gpt-test", [echo])))
    app = make_app([provider(upstream.url, api_key_env="UP_KEY")])
    answers = [post(app), post(app), post(app, STREAM)]
    assert upstream.requests[0].headers["Authorization"] == f"Bearer {secret}"
    assert [a.status_code for a in answers] == [400, 200, 200]
    for answer in answers:
        body = answer.get_data(as_text=True)
        assert secret not in body and "you sent [redacted], and [redacted]" in body


@pytest.mark.parametrize("status", [199, 204, 408, 999])
def test_a_status_no_provider_should_answer_is_a_provider_failure(make_app, upstream, status):
    upstream.script(Reply(status=status, raw=b"{}"), Reply(status=status, raw=b"{}"))
    app = make_app([provider(upstream.url)], http_client={"retry_attempts": 0})
    for body in (CHAT, STREAM):
        response = post(app, body)
        assert response.status_code == 502, (body, response.status_code)
        assert error_of(response)["code"] == "upstream_error"
