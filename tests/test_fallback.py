"""Routing and fallback: candidates in priority order, retryable failures move on, client errors don't."""

import pytest

from tests.conftest import provider
from tests.upstream import Hang, Reply, Reset, chat_completion

CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def two(make_app, upstream, upstream_b):
    """Provider a (priority 1) in front of provider b (priority 2), no retries."""
    return make_app([provider(upstream.url, "a", priority=1),
                     provider(upstream_b.url, "b", priority=2)],
                    http_client={"retry_attempts": 0, "timeout": 0.5})


def post(app, body=CHAT, **kw):
    return app.test_client().post("/v1/chat/completions", json=body, **kw)


def test_the_lowest_priority_number_is_tried_first(two, upstream, upstream_b):
    response = post(two)
    assert response.status_code == 200
    assert response.headers["X-Proxy-Provider"] == "a"
    assert (upstream.calls, upstream_b.calls) == (1, 0)


@pytest.mark.parametrize("failure", [
    Reply(500, {"error": {"message": "boom"}}),
    Reply(503, {"error": {"message": "overloaded"}}),
    Reply(429, {"error": {"message": "slow down"}}),
    Reply(401, {"error": {"message": "bad key"}}),
    Reply(403, {"error": {"message": "forbidden"}}),
    Reset(),
    Reset(partial=b'{"id": "chatcmpl-1", "choi'),
    Reply(200, raw=b'{"id": "not json'),
    Hang(2.0),
], ids=["500", "503", "429", "401", "403", "reset", "reset-mid-body", "malformed", "hang"])
def test_a_retryable_failure_falls_back_to_the_next_provider(two, upstream, upstream_b, failure):
    upstream.script(failure)
    response = post(two)
    assert response.status_code == 200, response.json
    assert response.headers["X-Proxy-Provider"] == "b"
    assert response.headers["X-Proxy-Attempts"] == "2"
    assert (upstream.calls, upstream_b.calls) == (1, 1)
    assert response.json["choices"][0]["message"]["content"] == "Hello from upstream"


@pytest.mark.parametrize("status", [400, 404, 422])
def test_a_client_error_is_returned_as_it_is_without_fallback(two, upstream, upstream_b, status):
    upstream.script(Reply(status, {"error": {"message": "bad temperature", "type":
                                             "invalid_request_error", "param": "temperature",
                                             "code": "invalid_value"}}))
    response = post(two)
    assert response.status_code == status
    assert response.json["error"]["message"] == "bad temperature"
    assert response.json["error"]["param"] == "temperature"
    assert upstream_b.calls == 0


def test_a_client_error_that_is_not_json_still_gets_an_openai_error(two, upstream):
    upstream.script(Reply(400, raw=b"<html>bad request</html>"))
    response = post(two)
    assert response.status_code == 400
    assert "HTTP 400" in response.json["error"]["message"]


def test_every_provider_failing_is_a_502_naming_each_failure(two, upstream, upstream_b):
    upstream.script(Reply(500, {}))
    upstream_b.script(Reset())
    response = post(two)
    assert response.status_code == 502
    error = response.json["error"]
    assert error["type"] == "upstream_error"
    assert "provider a answered HTTP 500" in error["message"]
    assert "provider b" in error["message"]


def test_every_provider_timing_out_is_a_504(two, upstream, upstream_b):
    upstream.script(Hang(2.0))
    upstream_b.script(Hang(2.0))
    response = post(two)
    assert response.status_code == 504
    assert response.json["error"]["code"] == "upstream_timeout"


def test_connection_refused_falls_back(make_app, upstream):
    app = make_app([provider("http://127.0.0.1:9", "dead", priority=1),
                    provider(upstream.url, "live", priority=2)],
                   http_client={"retry_attempts": 0})
    response = post(app)
    assert response.status_code == 200
    assert response.headers["X-Proxy-Provider"] == "live"


def test_a_disabled_provider_is_never_called(make_app, upstream, upstream_b):
    app = make_app([provider(upstream.url, "a", priority=1, enabled=False),
                    provider(upstream_b.url, "b", priority=2)])
    assert post(app).headers["X-Proxy-Provider"] == "b"
    assert upstream.calls == 0


def test_a_model_served_only_by_disabled_providers_is_a_503(make_app, upstream):
    app = make_app([provider(upstream.url, "a", enabled=False),
                    provider(upstream.url, "b", models=["other"])])
    response = post(app)
    assert response.status_code == 503
    assert response.json["error"]["code"] == "no_provider_available"


def test_glob_patterns_route_any_matching_model(make_app, upstream):
    app = make_app([provider(upstream.url, "a", models=["claude-*", "gpt-test"])])
    response = post(app, {**CHAT, "model": "claude-anything"})
    assert response.status_code == 200
    (sent,) = [r for r in upstream.requests if r.method == "POST"]  # GET /models: discovery
    assert sent.json()["model"] == "claude-anything"


def test_request_id_is_taken_from_the_client_and_sent_upstream(two, upstream):
    response = post(two, headers={"X-Request-ID": "abc-123"})
    assert response.headers["X-Request-ID"] == "abc-123"
    assert upstream.requests[0].headers["X-Request-ID"] == "abc-123"


def test_a_request_id_is_generated_when_missing_or_unsafe(two, upstream):
    response = post(two, headers={"X-Request-ID": "bad id\twith spaces"})
    assert response.headers["X-Request-ID"] != "bad id\twith spaces"
    assert len(response.headers["X-Request-ID"]) == 32
    assert upstream.requests[0].headers["X-Request-ID"] == response.headers["X-Request-ID"]


def test_overhead_header_excludes_upstream_time(make_app, upstream):
    upstream.script(Reply(200, chat_completion("gpt-test", "slow"), delay=0.3))
    app = make_app([provider(upstream.url)])
    response = post(app)
    assert response.status_code == 200
    assert float(response.headers["X-Proxy-Overhead-Ms"]) < 100


def test_extra_provider_headers_are_sent_and_the_key_comes_from_the_environment(
        make_app, upstream, monkeypatch):
    monkeypatch.setenv("TEST_PROVIDER_KEY", "sk-provider-secret")
    app = make_app([provider(upstream.url, api_key_env="TEST_PROVIDER_KEY",
                             headers={"OpenAI-Organization": "org-1"})])
    post(app, headers={"Authorization": "Bearer client-secret", "Cookie": "session=1"})
    headers = upstream.requests[0].headers
    assert headers["Authorization"] == "Bearer sk-provider-secret"
    assert headers["OpenAI-Organization"] == "org-1"
    assert "Cookie" not in headers
