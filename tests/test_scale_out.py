"""Two proxy processes sharing one Redis (two apps here, each with its own client): the cache,
rate limits and breakers are shared, and Redis going away costs no request."""

import hashlib

import pytest

from tests.conftest import FakeClock, provider
from tests.upstream import Reply

KEY = "sk-shared-0123456789abcdef"
CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}


def post(app, headers=None):
    response = app.test_client().post("/v1/chat/completions", json=CHAT, headers=headers or {})
    response.close()
    return response


@pytest.fixture
def pair(make_app, upstream, upstream_b, redis_url, prefix):
    """Build two apps ("processes") on the same Redis and prefix, same providers."""
    def build(clock=None, **sections):
        clock = clock or FakeClock()
        return [make_app([provider(upstream.url, "a", priority=1),
                          provider(upstream_b.url, "b", priority=2)], clock=clock,
                         redis={"url": redis_url, "prefix": prefix, "timeout": 0.5},
                         http_client={"retry_attempts": 0}, **sections)
                for _ in range(2)]
    return build


def test_one_process_sees_the_others_cache_entries(pair, upstream):
    one, two = pair(cache={"enabled": True})
    assert post(one).headers["X-Cache"] == "MISS"
    assert post(two).headers["X-Cache"] == "HIT"
    assert upstream.calls == 1


def test_a_rate_limit_admits_exactly_n_across_processes(pair):
    one, two = pair(auth={"api_keys_required": True, "requests_per_minute": 5,
                          "api_keys": [{"id": "k", "sha256": hashlib.sha256(KEY.encode())
                                        .hexdigest()}]})
    codes = [post(app, {"Authorization": f"Bearer {KEY}"}).status_code
             for _ in range(5) for app in (one, two)]
    assert codes.count(200) == 5 and codes.count(429) == 5


def test_a_breaker_opened_through_one_process_is_open_in_the_other(pair, upstream, upstream_b):
    clock = FakeClock()
    one, two = pair(clock)
    upstream.script(*[Reply(500, {})] * 5)
    for _ in range(5):
        assert post(one).headers["X-Proxy-Provider"] == "b"
    clock.advance(1)  # past the half second a process reuses what it read of shared state
    response = post(two)
    assert response.headers["X-Proxy-Provider"] == "b"
    assert response.headers["X-Proxy-Attempts"] == "1"  # a skipped without a call
    assert upstream.calls == 5
    providers = two.test_client().get("/providers").json["providers"]
    assert providers[0]["circuit_breaker"]["state"] == "open"


def test_redis_down_degrades_to_local_stores_without_a_single_5xx(make_app, upstream):
    app = make_app([provider(upstream.url)], cache={"enabled": True},
                   redis={"url": "redis://127.0.0.1:1/0", "timeout": 0.05},
                   auth={"requests_per_minute": 100})
    codes = [post(app).status_code for _ in range(20)]
    assert codes == [200] * 20
    assert upstream.calls == 1  # the local cache answered the rest
    health = app.test_client().get("/health")
    assert health.status_code == 200 and health.json["status"] == "warning"
    redis_check = health.json["checks"]["redis"]
    assert redis_check["status"] == "warning" and redis_check["fallbacks"] > 0
    metrics = app.test_client().get("/metrics").get_data(as_text=True)
    assert "llm_proxy_redis_available 0.0" in metrics
