"""OpenTelemetry traces, checked against a real OTLP/HTTP receiver on loopback: the span tree,
the HTTP and GenAI attributes, parent links, the client's trace continued and carried on to
the provider, streams ending at their last event, fallbacks, sampling, hostile trace headers,
and a receiver that is down or slow never slowing a request."""

from __future__ import annotations

import hashlib
import logging
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from app import create_app
from app.observability.span_attributes import answer_facts
from app.pipeline import Attempts, Request
from app.providers import Call
from settings import build_settings, load_settings
from tests.anthropic_upstream import anthropic_answer
from tests.conftest import live_server, provider
from tests.otlp_receiver import Blackhole, OTLPReceiver
from tests.upstream import FakeUpstream, Reply, Stream, chat_chunks, chat_completion, \
    responses_answer

ROOT = Path(__file__).resolve().parents[1]
CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}
CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"
TRACEPARENT = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
KEY = "sk-proxy-tracing-0123456789abcdef"
MOCK = {"name": "mock", "type": "mock", "models": ["gpt-test"]}


@pytest.fixture
def receiver():
    with OTLPReceiver() as r:
        yield r


@pytest.fixture
def traced(make_app, receiver):
    """make_app with traces sent to the receiver (``observability`` merged in)."""
    def make(providers, **sections):
        observability = {"traces_endpoint": receiver.endpoint,
                         **sections.pop("observability", {})}
        return make_app(providers, observability=observability, **sections)
    return make


def tracing(app):
    return app.extensions["llm_proxy"].tracing


def post(app, path="/v1/chat/completions", body=CHAT, **kw):
    """A request through the test client, closed as a server closes it after the last byte
    (its span ends then); its JSON read first."""
    response = app.test_client().post(path, json=body, **kw)
    response.get_data()
    response.close()
    return response


def spans(app, receiver, n, timeout=2.0):
    """The receiver's spans once it holds ``n``: flushed until then (a live server ends a
    request's span just after its last byte, which may come after the client read it)."""
    deadline = time.monotonic() + timeout
    while True:
        assert tracing(app).flush(timeout)
        if len(receiver.spans) >= n or time.monotonic() > deadline:
            return receiver.wait_for(n, timeout=0.1)
        time.sleep(0.01)


def server_span(found):
    (server,) = [s for s in found if s.kind == "SERVER"]
    return server


def children(found, parent):
    return [s for s in found if s.parent_id == parent.span_id]


def traceparent_of(recorded) -> tuple[str, str, bool]:
    """(trace id, parent span id, sampled) of the traceparent an upstream received (a new
    trace's flags also say its id is random: W3C Trace Context level 2)."""
    version, trace_id, parent, flags = recorded.headers["traceparent"].split("-")
    assert version == "00" and len(flags) == 2
    return trace_id, parent, bool(int(flags, 16) & 1)


# --- off --------------------------------------------------------------------------------------

SERVE_WITHOUT_TRACING = (
    "from app import create_app\n"
    "from settings import build_settings\n"
    "app = create_app(build_settings({'providers': [{'name': 'mock', 'type': 'mock', "
    "'models': ['m']}], 'database': {'enabled': False}}))\n"
    "for stream in (False, True):\n"
    "    r = app.test_client().post('/v1/chat/completions', json={'model': 'm', 'messages': "
    "[{'role': 'user', 'content': 'hi'}], 'stream': stream})\n"
    "    assert r.status_code == 200 and r.get_data(); r.close()\n"
    "app.extensions['llm_proxy'].close()\n")
LOADED = "import sys; print(sorted(m for m in sys.modules if m.split('.')[0] == 'opentelemetry'))\n"


def fresh_python(code: str) -> str:
    """The last line ``code`` prints in a fresh interpreter run from the checkout."""
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""


def test_with_tracing_off_the_proxy_imports_nothing_of_opentelemetry():
    """A fresh interpreter where any import of OpenTelemetry fails: the app builds, serves a
    whole answer and a stream, and closes, so nothing of it is imported on that path."""
    blocked = "import sys; sys.modules['opentelemetry'] = None  # any import of it fails\n"
    fresh_python(blocked + SERVE_WITHOUT_TRACING)


def test_with_tracing_off_and_no_redis_no_opentelemetry_module_is_loaded():
    """Unblocked, and with the SDK installed: nothing of OpenTelemetry is loaded, not even what
    redis-py (>= 7) loads for its optional metrics (redis-py itself is imported only with
    REDIS_URL set: tests/test_startup.py)."""
    assert fresh_python(SERVE_WITHOUT_TRACING + LOADED) == "[]"


def test_with_tracing_off_the_request_carries_no_span_and_the_upstream_no_traceparent(
        make_app, upstream):
    app = make_app([provider(upstream.url)])
    assert not tracing(app).enabled
    assert post(app).status_code == 200
    assert "traceparent" not in {k.lower() for k in upstream.requests[0].headers}


# --- on -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("environ, endpoint", [
    ({}, ""),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, "http://collector:4318/v1/traces"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/"}, "http://collector:4318/v1/traces"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318",
      "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://traces:9/in"}, "http://traces:9/in"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318",
      "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": ""}, "http://collector:4318/v1/traces"),
], ids=["unset", "base", "base-slash", "traces-url-wins", "empty-traces-url-is-unset"])
def test_the_standard_variables_say_where_traces_go(environ, endpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no config.yaml
    assert load_settings(environ).observability.traces_endpoint == endpoint


def test_an_empty_opentelemetry_variable_counts_as_unset(tmp_path, monkeypatch):
    """OpenTelemetry's rule, and what a compose file's ${VAR:-} passes."""
    monkeypatch.chdir(tmp_path)
    observability = load_settings({"OTEL_TRACES_SAMPLER_ARG": " ", "OTEL_SERVICE_NAME": "",
                                   "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": ""}).observability
    assert (observability.traces_sample_ratio, observability.service_name,
            observability.traces_endpoint) == (1.0, "llm-proxy", "")


# --- the request's span -----------------------------------------------------------------------

def test_a_request_is_a_server_span_with_the_http_conventions_and_the_proxys_findings(
        traced, receiver, upstream):
    app = traced([provider(upstream.url)], observability={"service_name": "proxy-under-test"},
                 auth={"api_keys_required": True,
                       "api_keys": [{"id": "team-a", "sha256": hashlib.sha256(
                           KEY.encode()).hexdigest()}]},
                 pricing={"models": [{"model": "gpt-test", "input": 3.0, "output": 15.0}]})
    response = post(app, headers={"Authorization": f"Bearer {KEY}", "User-Agent": "tests/1.0",
                                  "X-Request-ID": "req-abc-123"})
    assert response.status_code == 200
    found = spans(app, receiver, 2)
    server = server_span(found)
    assert server.name == "POST /v1/chat/completions"
    assert server.parent_id == ""
    a = server.attributes
    assert a["http.request.method"] == "POST"
    assert a["http.route"] == "/v1/chat/completions"
    assert a["url.path"] == "/v1/chat/completions"
    assert a["url.scheme"] == "http"
    assert a["http.response.status_code"] == 200
    assert a["server.address"] == "localhost" and a["server.port"] == 80
    assert a["client.address"] == "127.0.0.1"
    assert a["user_agent.original"] == "tests/1.0"
    assert a["llm_proxy.request_id"] == "req-abc-123" == response.headers["X-Request-ID"]
    assert a["llm_proxy.provider"] == "up" and a["llm_proxy.model"] == "gpt-test"
    assert a["llm_proxy.key_id"] == "team-a"
    assert a["llm_proxy.attempts"] == 1
    assert a["llm_proxy.cost_usd"] == pytest.approx(float(response.headers["X-Proxy-Cost-USD"]))
    assert server.status == "UNSET" and "error.type" not in a
    assert server.resource["service.name"] == "proxy-under-test"
    assert server.resource["service.version"] == app.extensions["llm_proxy"].settings.version
    everything = repr([(s.attributes, [e.attributes for e in s.events]) for s in found])
    assert KEY not in everything and KEY[-12:] not in everything


def test_a_proxy_error_marks_the_server_span_failed(traced, receiver, upstream):
    app = traced([provider(upstream.url)], http_client={"retry_attempts": 0})
    upstream.script(Reply(500, {"error": {"message": "down"}}))
    assert post(app).status_code == 502
    server = server_span(spans(app, receiver, 2))
    assert server.status == "ERROR"
    assert server.attributes["http.response.status_code"] == 502
    assert server.attributes["error.type"] == "upstream_error"


def test_a_client_error_is_no_failure_of_the_server_span(traced, receiver, upstream):
    app = traced([provider(upstream.url)])
    assert post(app, body={"model": "gpt-test"}).status_code == 400
    server = server_span(spans(app, receiver, 1))
    assert server.attributes["http.response.status_code"] == 400
    assert server.status == "UNSET"


def test_probes_and_scrapes_get_no_span(traced, receiver, upstream):
    app = traced([provider(upstream.url)])
    client = app.test_client()
    for path in ("/health", "/health/live", "/metrics"):
        response = client.get(path)
        response.get_data()
        response.close()
    post(app)
    found = spans(app, receiver, 2)
    assert [s.attributes.get("url.path") for s in found if s.kind == "SERVER"] == [
        "/v1/chat/completions"]


# --- the tree ---------------------------------------------------------------------------------

def test_the_cache_lookup_and_the_attempt_are_children_of_the_request_span(
        traced, receiver, upstream):
    app = traced([provider(upstream.url)], cache={"enabled": True})
    post(app)
    post(app)  # the same again: a hit
    found = spans(app, receiver, 5)
    first, second = sorted((s for s in found if s.kind == "SERVER"), key=lambda s: s.start_ns)
    lookup, attempt = sorted(children(found, first), key=lambda s: s.start_ns)
    assert (lookup.name, lookup.kind, lookup.attributes["llm_proxy.cache.hit"]) == (
        "cache lookup", "INTERNAL", False)
    assert (attempt.name, attempt.kind) == ("chat gpt-test", "CLIENT")
    assert {s.trace_id for s in (first, lookup, attempt)} == {first.trace_id}
    (hit,) = children(found, second)
    assert (hit.name, hit.attributes["llm_proxy.cache.hit"]) == ("cache lookup", True)
    assert second.attributes["llm_proxy.cache"] == "HIT"
    assert second.trace_id != first.trace_id


def test_the_attempt_span_follows_the_genai_conventions(traced, receiver, upstream):
    app = traced([provider(upstream.url, models=["gpt-test"], aliases={"fast": "gpt-test"})])
    upstream.script(Reply(body=chat_completion("gpt-test-2024-08-06", "Hello")))
    post(app, body={**CHAT, "model": "fast", "max_tokens": 50, "temperature": 0.2})
    found = spans(app, receiver, 2)
    (attempt,) = children(found, server_span(found))
    assert attempt.kind == "CLIENT"
    assert attempt.name == "chat gpt-test"
    a = attempt.attributes
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.provider.name"] == "openai"
    assert a["llm_proxy.provider"] == "up"
    assert a["gen_ai.request.model"] == "gpt-test"
    assert a["gen_ai.response.model"] == "gpt-test-2024-08-06"
    assert a["gen_ai.request.max_tokens"] == 50
    assert a["gen_ai.request.temperature"] == 0.2
    assert "gen_ai.request.stream" not in a  # said of streams only
    assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) == (5, 3)
    assert a["gen_ai.response.finish_reasons"] == ("stop",)
    assert a["server.address"] == "127.0.0.1" and a["server.port"] == upstream.port
    assert attempt.status == "UNSET" and "error.type" not in a


def test_embeddings_and_completions_name_their_operations(traced, receiver, upstream):
    app = traced([provider(upstream.url)])
    post(app, "/v1/embeddings", {"model": "gpt-test", "input": "hi"})
    post(app, "/v1/completions", {"model": "gpt-test", "prompt": "hi"})
    found = spans(app, receiver, 4)
    operations = sorted(s.attributes["gen_ai.operation.name"] for s in found
                        if s.kind == "CLIENT")
    assert operations == ["embeddings", "text_completion"]


def test_the_mock_provider_is_an_attempt_without_a_server(traced, receiver):
    app = traced([MOCK])
    post(app)
    found = spans(app, receiver, 2)
    (attempt,) = children(found, server_span(found))
    assert attempt.attributes["gen_ai.provider.name"] == "llm_proxy.mock"
    assert "server.address" not in attempt.attributes


def test_a_condensed_chat_has_a_condense_span_over_its_summary_call(traced, receiver, upstream):
    app = traced([provider(upstream.url, models=["gpt-test", "summarizer"])],
                 condense={"threshold_tokens": 500, "keep_last": 2, "step": 2,
                           "summary_model": "summarizer"}, http_client={"retry_attempts": 0})
    long_chat = [{"role": "user" if i % 2 == 0 else "assistant", "content": "x" * 400}
                 for i in range(8)]
    assert post(app, body={"model": "gpt-test", "messages": long_chat}).headers[
        "X-Proxy-Condensed"] == "summary"
    post(app)  # a short chat: no condense span
    found = spans(app, receiver, 6)
    first, second = sorted((s for s in found if s.kind == "SERVER"), key=lambda s: s.start_ns)
    condense, main = sorted(children(found, first), key=lambda s: s.start_ns)
    assert (condense.name, condense.kind) == ("condense", "INTERNAL")
    assert condense.attributes["llm_proxy.condensed"] == "summary"
    (summary,) = children(found, condense)
    assert summary.name == "chat summarizer" and summary.kind == "CLIENT"
    assert main.name == "chat gpt-test"
    assert [s.name for s in children(found, second)] == ["chat gpt-test"]


# --- the client's trace, carried on -----------------------------------------------------------

def test_the_clients_traceparent_continues_its_trace_and_reaches_the_provider(
        traced, receiver, upstream):
    app = traced([provider(upstream.url)])
    post(app, headers={"traceparent": TRACEPARENT, "tracestate": "vendor=abc,t@sys=1"})
    found = spans(app, receiver, 2)
    server = server_span(found)
    (attempt,) = children(found, server)
    assert server.trace_id == attempt.trace_id == CLIENT_TRACE
    assert server.parent_id == CLIENT_SPAN
    recorded = upstream.requests[0]
    assert traceparent_of(recorded) == (CLIENT_TRACE, attempt.span_id, True)
    assert recorded.headers["tracestate"] == "vendor=abc,t@sys=1"


@pytest.mark.parametrize("kind", ["openai", "azure_openai", "anthropic", "responses",
                                  "messages"])
def test_every_adapter_sends_the_attempts_traceparent_upstream(traced, receiver, kind,
                                                               monkeypatch):
    monkeypatch.setenv("AZ_KEY", "azure-secret")
    default = {"anthropic": anthropic_answer, "messages": anthropic_answer,
               "responses": responses_answer}.get(kind)
    entries = {
        "openai": lambda url: provider(url),
        "azure_openai": lambda url: {"name": "azure", "type": "azure_openai", "base_url": url,
                                     "api_key_env": "AZ_KEY", "api_version": "2024-10-21",
                                     "models": ["gpt-test"]},
        "anthropic": lambda url: {"name": "claude", "type": "anthropic", "base_url": url,
                                  "models": ["gpt-test"]},
        "messages": lambda url: {"name": "claude", "type": "anthropic", "base_url": url,
                                 "models": ["gpt-test"]},
        "responses": lambda url: provider(url, responses=True),
    }
    with FakeUpstream(default) as upstream:
        app = traced([entries[kind](upstream.url)])
        if kind == "responses":
            response = post(app, "/v1/responses", {"model": "gpt-test", "input": "hi"})
        elif kind == "messages":
            response = post(app, "/v1/messages", {"model": "gpt-test", "max_tokens": 16,
                                                  "messages": [{"role": "user",
                                                                "content": "hi"}]},
                            headers={"anthropic-version": "2023-06-01"})
        else:
            response = post(app)
        assert response.status_code == 200, response.get_data()
        found = spans(app, receiver, 2)
        (attempt,) = children(found, server_span(found))
        assert traceparent_of(upstream.requests[0]) == (attempt.trace_id, attempt.span_id, True)
        expected = {"azure_openai": "azure.ai.openai", "anthropic": "anthropic",
                    "messages": "anthropic"}.get(kind, "openai")
        assert attempt.attributes["gen_ai.provider.name"] == expected
        assert attempt.attributes["gen_ai.response.finish_reasons"] in (
            ("stop",), ("end_turn",), ("completed",))


def test_each_http_retry_is_an_event_of_one_attempt_span(traced, receiver, upstream):
    app = traced([provider(upstream.url)], http_client={"retry_attempts": 1})
    upstream.script(Reply(503, {"error": {"message": "busy"}}))
    assert post(app).status_code == 200
    found = spans(app, receiver, 2)
    (attempt,) = children(found, server_span(found))
    retry = attempt.event("retry")
    assert retry.attributes["http.request.resend_count"] == 1
    assert retry.attributes["error.type"] == "503"
    assert attempt.attributes["http.request.resend_count"] == 1
    assert [traceparent_of(r)[1] for r in upstream.requests] == [attempt.span_id] * 2


# --- fallback and breakers --------------------------------------------------------------------

def test_a_fallback_shows_both_attempts_and_the_decisions(traced, receiver, upstream,
                                                          upstream_b):
    app = traced([provider(upstream.url, "a", priority=1),
                  provider(upstream_b.url, "b", priority=2)],
                 http_client={"retry_attempts": 0},
                 circuit_breaker={"failure_threshold": 1, "adaptive_thresholds": False})
    upstream.script(Reply(500, {"error": {"message": "boom"}}))
    response = post(app)
    assert response.status_code == 200 and response.headers["X-Proxy-Provider"] == "b"
    found = spans(app, receiver, 3)
    server = server_span(found)
    first, second = sorted(children(found, server), key=lambda s: s.start_ns)
    assert (first.kind, second.kind) == ("CLIENT", "CLIENT")
    assert first.attributes["llm_proxy.provider"] == "a"
    assert first.status == "ERROR" and first.attributes["error.type"] == "500"
    assert second.attributes["llm_proxy.provider"] == "b" and second.status == "UNSET"
    assert first.end_ns <= second.start_ns
    fallback = server.event("fallback")
    assert fallback.attributes["llm_proxy.fallback.from"] == "a"
    assert fallback.attributes["llm_proxy.fallback.to"] == "b"
    assert fallback.attributes["error.type"] == "500"
    assert "HTTP 500" in fallback.attributes["llm_proxy.reason"]
    assert server.attributes["llm_proxy.attempts"] == 2
    assert traceparent_of(upstream.requests[0])[1] == first.span_id
    assert traceparent_of(upstream_b.requests[0])[1] == second.span_id

    # The breaker of a opened: the next request skips it, and says so.
    receiver.spans.clear()
    assert post(app).headers["X-Proxy-Provider"] == "b"
    found = spans(app, receiver, 2)
    server = server_span(found)
    skipped = server.event("candidate skipped")
    assert skipped.attributes["llm_proxy.provider"] == "a"
    assert "circuit open" in skipped.attributes["llm_proxy.reason"]
    assert [s.attributes["llm_proxy.provider"] for s in children(found, server)] == ["b"]


# --- streams ----------------------------------------------------------------------------------

def test_a_streams_spans_end_after_its_last_event(traced, receiver, upstream):
    delay, pieces = 0.05, ["a", "b", "c", "d"]
    events = chat_chunks("gpt-test", pieces)  # four pieces, the finish chunk, [DONE]
    arrived = []

    def stream(recorded):
        arrived.append(time.time_ns())
        return Stream(events, delay=delay)
    upstream.script(stream)
    app = traced([provider(upstream.url)])
    with live_server(app) as url:
        response = requests.post(url + "/v1/chat/completions", json={**CHAT, "stream": True},
                                 stream=True, timeout=5)
        lines = [line for line in response.iter_lines() if line]
        response.close()
        assert lines[-1] == b"data: [DONE]"
        found = spans(app, receiver, 2)
    server = server_span(found)
    (attempt,) = children(found, server)
    last_sent = arrived[0] + (len(events) - 1) * delay * 1e9  # the upstream's last write
    assert attempt.end_ns >= last_sent and server.end_ns >= last_sent
    assert server.end_ns >= attempt.end_ns
    assert attempt.attributes["gen_ai.response.finish_reasons"] == ("stop",)
    assert attempt.attributes["gen_ai.response.model"] == "gpt-test"
    assert attempt.attributes["gen_ai.request.stream"] is True
    assert attempt.attributes["gen_ai.response.time_to_first_chunk"] >= 0
    assert attempt.attributes["gen_ai.usage.output_tokens"] > 0
    assert attempt.attributes["llm_proxy.usage_estimated"] is True  # the fake sends no usage
    assert "llm_proxy.cancelled" not in attempt.attributes


def test_a_stream_the_client_leaves_ends_its_attempt_span_as_cancelled(traced, receiver,
                                                                       upstream):
    upstream.script(Stream(chat_chunks("gpt-test", ["x"] * 40), delay=0.05))
    app = traced([provider(upstream.url)])
    with live_server(app) as url:
        response = requests.post(url + "/v1/chat/completions", json={**CHAT, "stream": True},
                                 stream=True, timeout=5)
        next(line for line in response.iter_lines() if line)
        response.close()  # the client leaves after the first event
        found = spans(app, receiver, 2)
    (attempt,) = children(found, server_span(found))
    assert attempt.attributes["llm_proxy.cancelled"] is True
    assert attempt.status == "UNSET"


def test_an_orphaned_relay_ends_its_attempt_span_when_the_gateway_settles_it(
        traced, receiver, upstream):
    app = traced([provider(upstream.url)])
    llm_proxy = app.extensions["llm_proxy"]
    with app.test_request_context("/v1/chat/completions", method="POST"):
        from flask import request as flask_request
        span = llm_proxy.tracing.server_span(flask_request, "orphan")
    request = Request(id="orphan", started=llm_proxy.clock(),
                      deadline=llm_proxy.clock() + 5, span=span)
    relay = llm_proxy.gateway.stream(Call("chat", {**CHAT, "stream": True}, stream=True),
                                     request, Attempts())
    next(relay)
    del relay  # dropped unclosed: its outcome waits for the gateway's next request
    assert post(app).status_code == 200
    found = spans(app, receiver, 3)
    (orphan,) = [s for s in found if s.parent_id == f"{span.get_span_context().span_id:016x}"]
    assert orphan.kind == "CLIENT" and orphan.attributes["llm_proxy.cancelled"] is True


# --- sampling ---------------------------------------------------------------------------------

@pytest.fixture
def seeded():
    """Trace ids come from ``random``: seeded, a sampling test is deterministic."""
    random.seed(19)
    yield
    random.seed()


def test_a_ratio_of_zero_keeps_no_new_trace_but_follows_a_sampled_parent(
        traced, receiver, upstream):
    app = traced([provider(upstream.url)], observability={"traces_sample_ratio": 0.0})
    for _ in range(5):
        post(app)
    assert tracing(app).flush() and receiver.spans == []
    assert all(traceparent_of(r)[2] is False for r in upstream.requests)  # passed on, unsampled
    post(app, headers={"traceparent": TRACEPARENT})
    found = spans(app, receiver, 2)
    assert {s.trace_id for s in found} == {CLIENT_TRACE}


def test_an_unsampled_parent_is_followed_and_its_context_still_reaches_the_provider(
        traced, receiver, upstream):
    app = traced([provider(upstream.url)])  # 100% of new traces
    post(app, headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-00"})
    assert tracing(app).flush() and receiver.spans == []
    trace_id, _, flags = traceparent_of(upstream.requests[0])
    assert (trace_id, flags) == (CLIENT_TRACE, False)


def test_one_percent_keeps_about_one_percent(traced, receiver, seeded):
    app = traced([MOCK], observability={"traces_sample_ratio": 0.01})
    client = app.test_client()
    for _ in range(2000):
        client.get("/v1/models").close()
    assert tracing(app).flush()
    kept = len(receiver.spans)
    assert 3 <= kept <= 40, kept  # 20 expected; a binomial's 99.99% bounds


# --- hostile trace headers --------------------------------------------------------------------

@pytest.mark.parametrize("traceparent", [
    "x" * 100_000,
    f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01" + "-" + "a" * 600,
    f"00-{'0' * 32}-{CLIENT_SPAN}-01",
    f"00-{CLIENT_TRACE}-{'0' * 16}-01",
    f"ff-{CLIENT_TRACE}-{CLIENT_SPAN}-01",
    f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01-extra",
    f"00-{CLIENT_TRACE.upper()}-{CLIENT_SPAN}-01",
    "00-zz-zz-zz",
    f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01, 00-{CLIENT_TRACE}-{CLIENT_SPAN}-01",
], ids=["huge", "long", "zero-trace", "zero-span", "version-ff", "extra-field", "uppercase",
        "garbage", "two-values"])
def test_a_hostile_traceparent_starts_a_new_trace_without_a_word(traced, receiver, upstream,
                                                                 caplog, traceparent):
    app = traced([provider(upstream.url)])
    with caplog.at_level(logging.WARNING):
        assert post(app, headers={"traceparent": traceparent}).status_code == 200
        found = spans(app, receiver, 2)
    server = server_span(found)
    assert server.trace_id != CLIENT_TRACE and server.parent_id == ""
    assert traceparent_of(upstream.requests[0])[0] == server.trace_id
    assert not [r for r in caplog.records if r.name.startswith("opentelemetry")]


@pytest.mark.parametrize("tracestate", ["a=" + "b" * 10_000, "===,,,", "UPPER=1",
                                        ",".join(f"k{i}=v" for i in range(40))],
                         ids=["huge", "malformed", "uppercase-key", "too-many-members"])
def test_a_hostile_tracestate_is_dropped_and_the_trace_continues(traced, receiver, upstream,
                                                                 caplog, tracestate):
    app = traced([provider(upstream.url)])
    with caplog.at_level(logging.WARNING):
        post(app, headers={"traceparent": TRACEPARENT, "tracestate": tracestate})
        found = spans(app, receiver, 2)
    assert server_span(found).trace_id == CLIENT_TRACE
    assert "tracestate" not in upstream.requests[0].headers
    assert not [r for r in caplog.records if r.name.startswith("opentelemetry")]


def test_values_a_client_chose_are_cut_without_a_warning(traced, receiver, upstream, caplog):
    app = traced([provider(upstream.url, models=["gpt-*"])])
    model = "gpt-" + "x" * 5000  # served through the pattern
    with caplog.at_level(logging.WARNING):
        assert post(app, body={**CHAT, "model": model},
                    headers={"User-Agent": "u" * 5000}).status_code == 200
        found = spans(app, receiver, 2)
    server = server_span(found)
    (attempt,) = children(found, server)
    assert server.attributes["user_agent.original"] == "u" * 1024
    assert server.attributes["llm_proxy.model"] == model[:1024]
    assert attempt.attributes["gen_ai.request.model"] == model[:1024]
    assert attempt.name == "chat " + model[:1024]
    assert not [r for r in caplog.records if r.name.startswith("opentelemetry")]


@pytest.mark.parametrize("documents", [
    [b"not json"], [b"[1, 2]"], [b'{"choices": "no"}'], [b'{"choices": [null, 1]}'],
    [b'{"model": 7, "delta": []}'], [b'{"type": "message_start", "message": 3}'],
    [b"data: [DONE]\n\n", b": keepalive\n\n", b"event: x\n\n"], [b""], [],
])
def test_answers_of_any_shape_give_what_they_can_and_never_raise(documents):
    model, reasons = answer_facts(documents)
    assert isinstance(model, str) and isinstance(reasons, tuple)


class BrokenTracer:
    """The SDK's tracer, failing every span of one kind (SERVER, INTERNAL or CLIENT)."""

    def __init__(self, tracer, kind):
        self._tracer, self._kind = tracer, kind

    def start_span(self, name, *, context=None, kind=None, **kwargs):
        if (kind.name if kind is not None else "INTERNAL") == self._kind:
            raise RuntimeError("the tracer broke")
        return self._tracer.start_span(name, context=context,
                                       **({"kind": kind} if kind else {}), **kwargs)


@pytest.mark.parametrize("kind", ["SERVER", "INTERNAL", "CLIENT"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_broken_tracer_never_breaks_a_request_nor_holds_a_providers_slot(
        traced, receiver, upstream, kind, stream):
    app = traced([provider(upstream.url)], cache={"enabled": True},
                 routing={"provider_max_in_flight": 1})
    tracing(app)._tracer = BrokenTracer(tracing(app)._tracer, kind)
    for i in range(3):  # a slot left held would refuse the next; each a miss (no-cache)
        response = post(app, body={**CHAT, "stream": stream},
                        headers={"Cache-Control": "no-cache"} if i else {})
        assert response.status_code == 200 and response.headers["X-Proxy-Provider"] == "up"
    assert app.extensions["llm_proxy"].bulkheads["up"].in_flight == 0
    assert tracing(app).flush()
    assert kind not in {s.kind for s in receiver.spans}


# --- a receiver that is down or slow ----------------------------------------------------------

def test_a_dead_receiver_never_slows_nor_fails_a_request(make_app, monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "1")  # the exporter's own bound
    with Blackhole() as hole:
        app = make_app([MOCK], observability={"traces_endpoint": hole.endpoint})
        post(app)
        assert not tracing(app).flush(timeout=0.1)  # the export now hangs on the receiver
        started = time.monotonic()
        for _ in range(50):  # a few ms each with the mock provider
            assert post(app).status_code == 200
        assert time.monotonic() - started < 1.0
        started = time.monotonic()
        tracing(app).close(timeout=0.2)
        assert time.monotonic() - started < 0.5


def test_an_unreachable_receiver_never_fails_a_request(make_app):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    app = make_app([MOCK],
                   observability={"traces_endpoint": f"http://127.0.0.1:{port}/v1/traces"})
    for _ in range(5):
        assert post(app).status_code == 200
    started = time.monotonic()
    tracing(app).close(timeout=0.2)
    assert time.monotonic() - started < 0.5


def test_a_full_export_queue_drops_spans_and_counts_them(traced, receiver, upstream, caplog):
    app = traced([provider(upstream.url)])
    tracing(app).queue_limit = 3  # spans ended and not yet exported
    with caplog.at_level(logging.WARNING, logger="llm_proxy.tracing"):
        for _ in range(5):
            assert post(app).status_code == 200
    stats = tracing(app).stats()
    assert (stats["queued"], stats["dropped"]) == (3, 7)  # two spans a request
    assert len([r for r in caplog.records if "dropped" in r.getMessage()]) == 1
    assert tracing(app).flush() and len(receiver.spans) == 3
    assert tracing(app).stats()["exported"] == 3


def test_the_settings_build_a_tracer_of_the_apps_own(receiver):
    """Two apps, two providers: neither touches the global tracer provider."""
    from opentelemetry import trace as trace_api

    before = trace_api.get_tracer_provider()
    apps = [create_app(build_settings({"providers": [MOCK], "database": {"enabled": False},
                                       "observability": {"traces_endpoint": receiver.endpoint,
                                                         "service_name": f"app-{i}"}}))
            for i in range(2)]
    try:
        for app in apps:
            post(app)
            assert tracing(app).flush()
        found = receiver.wait_for(4)
        assert {s.resource["service.name"] for s in found} == {"app-0", "app-1"}
        assert trace_api.get_tracer_provider() is before
    finally:
        for app in apps:
            app.extensions["llm_proxy"].close()
