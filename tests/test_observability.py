"""/health's documented shape, /health/live and /ready, /metrics (text and JSON), access log."""

import json

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import FakeClock, provider
from tests.upstream import Reply, Stream, chat_chunks

CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}
HEALTH_CHECKS = {
    "providers": {"status": str, "total": int, "enabled": int},
    "memory": {"status": str, "usage_percent": float, "used_mb": float, "available_mb": float},
    "cache": {"status": str, "entries": int, "hit_rate": float, "memory_mb": float},
    "http_client": {"status": str, "requests_total": int, "error_rate": float,
                    "avg_response_time_ms": float},
    "circuit_breakers": {"status": str, "total": int, "open": int, "closed": int},
}


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def app(make_app, upstream, upstream_b, clock):
    return make_app([provider(upstream.url, "a", priority=1),
                     provider(upstream_b.url, "b", priority=2)], clock=clock,
                    http_client={"retry_attempts": 0})


def post(app, body=CHAT, **kw):
    response = app.test_client().post("/v1/chat/completions", json=body, **kw)
    response.close()  # as a server does after the last byte: the access log and metrics run
    return response


def open_breaker(app, upstream, name="a"):
    upstream.script(*[Reply(500, {})] * 5)
    for _ in range(5):
        post(app)


def samples(app):
    text = app.test_client().get("/metrics").get_data(as_text=True)
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


def value(found, name, **labels):
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def test_health_has_exactly_the_documented_shape(app):
    post(app)
    body = app.test_client().get("/health").json
    assert set(body) == {"status", "timestamp", "version", "uptime", "checks"}
    assert isinstance(body["timestamp"], float) and isinstance(body["uptime"], float)
    assert set(body["checks"]) == set(HEALTH_CHECKS)
    for check, fields in HEALTH_CHECKS.items():
        assert set(body["checks"][check]) == set(fields), check
        for field, kind in fields.items():
            got = body["checks"][check][field]
            assert isinstance(got, kind) or (kind is float and isinstance(got, int)), (check, field)
    assert body["status"] == "healthy"


def test_an_open_breaker_is_a_warning(app, upstream):
    open_breaker(app, upstream)
    response = app.test_client().get("/health")
    assert response.status_code == 200
    assert response.json["status"] == "warning"
    assert response.json["checks"]["circuit_breakers"] == {"status": "warning", "total": 2,
                                                           "open": 1, "closed": 1}


def test_no_provider_able_to_serve_is_unhealthy_and_not_ready(app, upstream, upstream_b):
    open_breaker(app, upstream)
    upstream_b.script(*[Reply(500, {})] * 5)
    for _ in range(5):
        post(app)
    health = app.test_client().get("/health")
    assert health.status_code == 503 and health.json["status"] == "unhealthy"
    assert health.json["checks"]["providers"]["status"] == "unhealthy"
    assert app.test_client().get("/health/ready").status_code == 503
    assert app.test_client().get("/health/live").status_code == 200


def test_a_high_upstream_error_rate_is_a_warning(make_app, upstream):
    app = make_app([provider(upstream.url)], http_client={"retry_attempts": 0},
                   circuit_breaker={"failure_threshold": 1000, "adaptive_thresholds": False})
    upstream.script(*[Reply(500, {})] * 10)
    for _ in range(30):
        post(app)
    check = app.test_client().get("/health").json["checks"]["http_client"]
    assert check["status"] == "warning"
    assert check["requests_total"] == 30 and check["error_rate"] == pytest.approx(0.3333, abs=1e-3)


def test_ready_when_a_provider_can_serve(app):
    response = app.test_client().get("/health/ready")
    assert response.status_code == 200 and response.json["providers_available"] == 2


def test_metrics_move_after_requests(app, upstream):
    upstream.script(Reply(500, {}))
    post(app)  # a fails, b answers
    found = samples(app)
    assert value(found, "llm_proxy_upstream_requests_total", provider="a", outcome="failure") == 1
    assert value(found, "llm_proxy_upstream_requests_total", provider="b", outcome="success") == 1
    assert value(found, "llm_proxy_upstream_errors_total", provider="a", kind="status") == 1
    assert value(found, "llm_proxy_upstream_latency_seconds_count", provider="b") == 1
    assert value(found, "llm_proxy_tokens_total", provider="b", model="gpt-test",
                 type="prompt") == 5
    assert value(found, "llm_proxy_tokens_total", provider="b", model="gpt-test",
                 type="completion") == 3
    assert value(found, "llm_proxy_breaker_state", provider="a") == 0
    assert value(found, "llm_proxy_breaker_threshold", provider="a") == 5
    assert value(found, "llm_proxy_breaker_success_rate", provider="a") == 0
    assert value(found, "llm_proxy_requests_in_flight") == 0
    assert value(found, "llm_proxy_process_rss_bytes") > 10_000_000
    assert value(found, "llm_proxy_gc_collections_total", generation="0") >= 0
    assert value(found, "llm_proxy_http_request_total", method="POST", status="200") == 1
    assert ("llm_proxy_cache_entries", (("cache", "response_cache"),)) in found


def test_the_exporter_groups_by_url_rule_and_leaves_out_metrics(app):
    post(app)
    app.test_client().get("/metrics")
    text = app.test_client().get("/metrics").get_data(as_text=True)
    assert 'url_rule="/v1/chat/completions"' in text
    assert 'url_rule="/metrics"' not in text


def test_cache_results_and_stream_durations_are_counted(make_app, upstream):
    app = make_app([provider(upstream.url)], cache={"enabled": True})
    post(app)
    post(app)
    upstream.script(Stream(chat_chunks("gpt-test", ["a"])))
    post(app, {**CHAT, "stream": True, "temperature": 0.5})
    found = samples(app)
    assert value(found, "llm_proxy_cache_results_total", result="MISS") == 2
    assert value(found, "llm_proxy_cache_results_total", result="HIT") == 1
    assert value(found, "llm_proxy_stream_duration_seconds_count", provider="up") == 1
    assert value(found, "llm_proxy_cache_hits_total", cache="response_cache") == 1


def test_the_json_view_has_the_documented_sections(app):
    post(app)
    for response in (app.test_client().get("/metrics?format=json"),
                     app.test_client().get("/metrics", headers={"Accept": "application/json"})):
        body = response.json
        assert set(body) == {"system", "performance", "caches", "circuit_breakers", "costs"}
        assert set(body["performance"]) == {"http_client", "memory"}
        assert isinstance(body["caches"]["response_cache"]["hit_rate"], float)
        assert "summary_cache" in body["caches"]
        assert body["circuit_breakers"]["a"]["state"] == "closed"
        assert body["performance"]["http_client"]["requests_total"] == 1


def test_metrics_can_be_turned_off(make_app, upstream):
    app = make_app([provider(upstream.url)], observability={"metrics_enabled": False})
    post(app)
    assert app.test_client().get("/metrics").status_code == 404


@pytest.fixture
def access_lines(capsys):
    capsys.readouterr()
    return lambda: [line for line in capsys.readouterr().out.splitlines() if line.strip()]


def test_the_access_log_is_one_json_line_per_request_without_secrets(
        make_app, upstream, access_lines, monkeypatch):
    monkeypatch.setenv("UPSTREAM_KEY", "sk-provider-secret")
    app = make_app([provider(upstream.url, api_key_env="UPSTREAM_KEY")])
    post(app, headers={"Authorization": "Bearer client-secret", "X-Request-ID": "req-1"})
    app.test_client().get("/health")  # probes are not logged
    (line,) = access_lines()
    entry = json.loads(line)
    assert entry["request_id"] == "req-1" and entry["key_id"] == "anonymous"
    assert entry["model"] == "gpt-test" and entry["provider"] == "up" and entry["status"] == 200
    assert entry["attempts"] == 1 and entry["prompt_tokens"] == 5
    assert entry["total_ms"] >= entry["upstream_ms"] >= 0
    assert "secret" not in line


def test_the_access_log_can_be_text(make_app, upstream, access_lines):
    app = make_app([provider(upstream.url)], observability={"access_log_format": "text"})
    post(app)
    (line,) = access_lines()
    assert "status=200" in line and "provider=up" in line


@pytest.mark.parametrize("thresholds,status,code", [
    ({"memory_threshold_mb": 1, "emergency_threshold_mb": 100000}, "warning", 200),
    ({"memory_threshold_mb": 1, "emergency_threshold_mb": 2}, "unhealthy", 503),
])
def test_memory_past_its_thresholds_warns_or_is_unhealthy(make_app, upstream, thresholds,
                                                          status, code):
    """The process's RSS (tens of MB here) is past thresholds set at 1 and 2 MB."""
    app = make_app([provider(upstream.url)], memory_manager=thresholds)
    app.extensions["llm_proxy"].memory.check()
    response = app.test_client().get("/health")
    assert response.status_code == code
    assert response.json["checks"]["memory"]["status"] == status
    assert response.json["checks"]["memory"]["used_mb"] > 2


def test_memory_cleanup_route_answers_with_before_and_after(make_app, upstream):
    app = make_app([provider(upstream.url)], admin_api_key="admin", cache={"enabled": True})
    post(app)
    client = app.test_client()
    assert client.post("/debug/memory/cleanup").status_code == 401
    response = client.post("/debug/memory/cleanup?level=emergency",
                           headers={"Authorization": "Bearer admin"})
    assert response.status_code == 200
    body = response.json
    assert body["level"] == "emergency"
    assert body["before"]["entries"] == 1  # well within half the budget: shrinking keeps it
    assert body["after"]["entries"] <= body["before"]["entries"]
    assert body["before"]["rss_mb"] > 0 and body["gc_collected"] >= 0


def test_the_memory_thread_starts_with_the_app_and_stops_with_it(make_app, upstream):
    import threading
    before = {t for t in threading.enumerate() if t.name == "llm-proxy-memory"}
    app = make_app([provider(upstream.url)])
    memory = app.extensions["llm_proxy"].memory
    (thread,) = {t for t in threading.enumerate() if t.name == "llm-proxy-memory"} - before
    assert memory.running and thread.daemon
    assert memory.start() is False  # already running: no second thread
    app.extensions["llm_proxy"].close()
    assert not memory.running and not thread.is_alive()


PROXY_HEADERS = ("X-Proxy-Provider", "X-Proxy-Attempts", "X-Proxy-Overhead-Ms")


def test_a_cache_hit_carries_attempts_0_and_the_overhead_but_no_provider(make_app, upstream):
    app = make_app([provider(upstream.url, "a")], cache={"enabled": True})
    miss = post(app)
    assert miss.headers["X-Cache"] == "MISS" and miss.headers["X-Proxy-Provider"] == "a"
    for body in (CHAT, {**CHAT, "stream": True}):  # whole, and replayed as a stream
        hit = post(app, body)
        assert hit.headers["X-Cache"] == "HIT"
        assert hit.headers["X-Proxy-Attempts"] == "0"
        assert float(hit.headers["X-Proxy-Overhead-Ms"]) >= 0
        assert "X-Proxy-Provider" not in hit.headers  # unknown for a stored answer
    assert upstream.calls == 1


def test_a_502_carries_attempts_and_overhead_and_no_empty_provider(app, upstream, upstream_b):
    upstream.script(Reply(500, {}))
    upstream_b.script(Reply(500, {}))
    response = post(app)
    assert response.status_code == 502
    assert response.headers["X-Proxy-Attempts"] == "2"
    assert float(response.headers["X-Proxy-Overhead-Ms"]) >= 0
    assert "X-Proxy-Provider" not in response.headers


def test_a_503_with_every_provider_skipped_carries_attempts_0(make_app, upstream):
    app = make_app([provider(upstream.url, "a")], http_client={"retry_attempts": 0},
                   circuit_breaker={"failure_threshold": 1, "adaptive_thresholds": False})
    upstream.script(Reply(500, {}))
    assert post(app).status_code == 502
    response = post(app)
    assert response.status_code == 503
    assert response.headers["X-Proxy-Attempts"] == "0"
    assert "X-Proxy-Overhead-Ms" in response.headers and "X-Proxy-Provider" not in response.headers


def test_a_request_the_proxy_refuses_itself_carries_attempts_0(app, upstream):
    response = post(app, {**CHAT, "model": "nope"})
    assert response.status_code == 404
    assert response.headers["X-Proxy-Attempts"] == "0"
    assert "X-Proxy-Overhead-Ms" in response.headers and "X-Proxy-Provider" not in response.headers
    assert upstream.calls == 0


def test_an_upstreams_own_client_error_names_its_provider(app, upstream):
    upstream.script(Reply(400, {"error": {"message": "bad", "type": "invalid_request_error"}}))
    response = post(app)
    assert response.status_code == 400
    assert response.headers["X-Proxy-Provider"] == "a"
    assert response.headers["X-Proxy-Attempts"] == "1"


def test_answers_that_are_not_proxied_carry_no_proxy_headers(app):
    for path in ("/v1/models", "/providers", "/health"):
        response = app.test_client().get(path)
        assert response.status_code == 200 and "X-Request-ID" in response.headers
        assert not set(PROXY_HEADERS) & set(response.headers.keys()), path
