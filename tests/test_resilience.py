"""Resilience through HTTP: breakers per provider, cool-downs, bulkheads, load balancing."""

import concurrent.futures
import random
import time

import pytest
import requests

from app.pipeline.router import Router
from tests.conftest import FakeClock, live_server, provider, wait_for_calls
from tests.upstream import Hang, Reply

CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}
ADMIN = {"Authorization": "Bearer admin-secret"}


def post(app, body=CHAT, **kw):
    return app.test_client().post("/v1/chat/completions", json=body, **kw)


def breaker(app, name):
    providers = app.test_client().get("/providers").json["providers"]
    return next(p for p in providers if p["name"] == name)["circuit_breaker"]


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def pair(make_app, upstream, upstream_b, clock):
    """a (priority 1) in front of b (priority 2); no retries; the default breaker settings."""
    return make_app([provider(upstream.url, "a", priority=1),
                     provider(upstream_b.url, "b", priority=2)],
                    clock=clock, http_client={"retry_attempts": 0, "timeout": 0.5},
                    admin_api_key="admin-secret")


def test_breaker_opens_after_five_failures_then_skips_the_provider(pair, upstream, upstream_b):
    upstream.script(*[Reply(500, {})] * 5)
    for _ in range(5):
        assert post(pair).headers["X-Proxy-Provider"] == "b"
    assert breaker(pair, "a")["state"] == "open"
    response = post(pair)
    assert response.headers["X-Proxy-Provider"] == "b"
    assert response.headers["X-Proxy-Attempts"] == "1"  # a was skipped, not tried
    assert upstream.calls == 5


def test_breaker_goes_half_open_after_the_recovery_timeout_and_closes_after_three_successes(
        pair, upstream, clock):
    upstream.script(*[Reply(500, {})] * 5)
    for _ in range(5):
        post(pair)
    clock.advance(59)
    assert post(pair).headers["X-Proxy-Provider"] == "b"  # still open
    assert breaker(pair, "a")["retry_in"] == pytest.approx(1)
    clock.advance(1)
    for expected in ("half_open", "half_open", "closed"):
        assert post(pair).headers["X-Proxy-Provider"] == "a"
        assert breaker(pair, "a")["state"] == expected
    assert upstream.calls == 8


def test_a_failure_while_half_open_opens_the_breaker_again(pair, upstream, clock):
    upstream.script(*[Reply(500, {})] * 6)
    for _ in range(5):
        post(pair)
    clock.advance(60)
    assert post(pair).headers["X-Proxy-Provider"] == "b"  # the trial failed and fell back
    state = breaker(pair, "a")
    assert state["state"] == "open" and state["retry_in"] == pytest.approx(60)


def test_when_every_candidate_is_open_the_answer_is_an_immediate_503_with_retry_after(
        pair, upstream, upstream_b, clock):
    upstream.script(*[Reply(500, {})] * 5)
    upstream_b.script(*[Reply(500, {})] * 5)
    for _ in range(5):
        assert post(pair).status_code == 502
    clock.advance(20)
    response = post(pair)
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "40"
    assert "circuit open" in response.json["error"]["message"]
    assert (upstream.calls, upstream_b.calls) == (5, 5)


def test_a_429_with_retry_after_cools_the_provider_down_for_that_long(pair, upstream, clock):
    upstream.script(Reply(429, {}, headers={"Retry-After": "30"}))
    assert post(pair).headers["X-Proxy-Provider"] == "b"
    clock.advance(29)
    assert post(pair).headers["X-Proxy-Provider"] == "b"
    clock.advance(1)
    assert post(pair).headers["X-Proxy-Provider"] == "a"
    assert upstream.calls == 2


def test_client_errors_never_open_the_breaker(pair, upstream):
    upstream.script(*[Reply(400, {"error": {"message": "bad"}})] * 10)
    for _ in range(10):
        assert post(pair).status_code == 400
    assert breaker(pair, "a")["state"] == "closed"
    assert breaker(pair, "a")["failures"] == 0


def test_with_a_fallback_left_a_failure_falls_back_at_once_without_retrying(
        make_app, upstream, upstream_b):
    app = make_app([provider(upstream.url, "a", priority=1),
                    provider(upstream_b.url, "b", priority=2)], http_client={"retry_attempts": 2})
    upstream.script(*[Reply(503, {})] * 3)
    response = post(app)
    assert response.headers["X-Proxy-Provider"] == "b"
    assert response.headers["X-Proxy-Attempts"] == "2"
    assert (upstream.calls, upstream_b.calls) == (1, 1)


def test_the_last_candidate_is_retried_exactly_as_configured(make_app, upstream, upstream_b):
    app = make_app([provider(upstream.url, "a", priority=1),
                    provider(upstream_b.url, "b", priority=2)], http_client={"retry_attempts": 2})
    upstream.script(Reply(500, {}))
    upstream_b.script(*[Reply(503, {})] * 2)
    response = post(app)
    assert response.status_code == 200 and response.headers["X-Proxy-Provider"] == "b"
    assert response.headers["X-Proxy-Attempts"] == "4"
    assert (upstream.calls, upstream_b.calls) == (1, 3)


def test_breaker_state_shows_in_providers(pair, upstream):
    upstream.script(Reply(500, {}))
    post(pair)
    post(pair)
    state = breaker(pair, "a")
    assert state["state"] == "closed"
    assert state["failures"] == 0  # the success after the failure reset the run
    assert state["success_rate"] == 0.5 and state["calls_in_window"] == 2
    assert state["threshold"] == 5


def test_reset_route_closes_all_breakers_or_one(pair, upstream, upstream_b):
    upstream.script(*[Reply(500, {})] * 5)
    upstream_b.script(*[Reply(500, {})] * 5)
    for _ in range(5):
        post(pair)
    client = pair.test_client()
    response = client.post("/debug/circuit-breakers/reset?name=a", headers=ADMIN)
    assert response.status_code == 200 and response.json["reset"] == ["a"]
    assert breaker(pair, "a")["state"] == "closed" and breaker(pair, "b")["state"] == "open"
    client.post("/debug/circuit-breakers/reset", headers=ADMIN)
    assert breaker(pair, "b")["state"] == "closed"
    assert client.post("/debug/circuit-breakers/reset?name=zz", headers=ADMIN).status_code == 404


@pytest.mark.parametrize("headers,status", [
    ({}, 401), ({"Authorization": "Bearer wrong"}, 401), ({"X-API-Key": "admin-secret"}, 200)])
def test_debug_routes_need_the_admin_key(pair, headers, status):
    response = pair.test_client().post("/debug/circuit-breakers/reset", headers=headers)
    assert response.status_code == status
    assert "admin-secret" not in response.get_data(as_text=True)


def test_debug_routes_are_disabled_without_an_admin_key(make_app, upstream):
    app = make_app([provider(upstream.url)])
    response = app.test_client().post("/debug/circuit-breakers/reset", headers=ADMIN)
    assert response.status_code == 403
    assert response.json["error"]["code"] == "admin_disabled"


def test_a_hanging_provider_cannot_starve_a_healthy_one(make_app, upstream, upstream_b):
    """More clients than threads hang on one provider; another provider's model is still served."""
    upstream.default = lambda r: Hang(10.0)  # until the test releases it
    app = make_app([provider(upstream.url, "slow", models=["slow-model"], max_in_flight=3),
                    provider(upstream_b.url, "fast", models=["fast-model"])],
                   server={"threads": 6}, http_client={"timeout": 5.0, "retry_attempts": 0})
    with live_server(app, threads=6) as url:
        def call(model):
            started = time.monotonic()
            r = requests.post(url + "/v1/chat/completions", json={**CHAT, "model": model}, timeout=10)
            return r.status_code, time.monotonic() - started

        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            slow = [pool.submit(call, "slow-model") for _ in range(10)]
            wait_for_calls(upstream, 3)  # the bulkhead is full
            status, seconds = call("fast-model")
            assert status == 200 and seconds < 2.0  # long before the hang ends
            upstream.stopping.set()
        results = [f.result() for f in slow]
    assert upstream.calls == 3  # the bulkhead let no more through
    refused = [seconds for code, seconds in results if code == 503]
    assert len(refused) == 7 and max(refused) < 2.0  # refused at once, not queued behind the hang


def test_past_the_global_limit_the_proxy_answers_503_at_once(make_app, upstream):
    upstream.default = lambda r: Hang(10.0)  # until the test releases it
    app = make_app([provider(upstream.url, max_in_flight=5)], routing={"max_in_flight": 2},
                   http_client={"timeout": 5.0, "retry_attempts": 0})
    with live_server(app, threads=6) as url:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            hanging = [pool.submit(requests.post, url + "/v1/chat/completions", json=CHAT,
                                   timeout=10) for _ in range(2)]
            wait_for_calls(upstream, 2)
            started = time.monotonic()
            response = requests.post(url + "/v1/chat/completions", json=CHAT, timeout=10)
            assert time.monotonic() - started < 2.0  # long before the hang ends
            upstream.stopping.set()  # release the hanging calls
            [f.result() for f in hanging]
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "proxy_overloaded"
    assert response.headers["Retry-After"] == "1"


def test_weighted_balancing_spreads_equal_priority_by_weight(make_app):
    app = make_app([{"name": "heavy", "type": "mock", "models": ["m"], "weight": 3},
                    {"name": "light", "type": "mock", "models": ["m"], "weight": 1}])
    # The app's providers, weights as configured, under a router with a seeded random source.
    router = Router(app.extensions["llm_proxy"].providers, rng=random.Random(15).random)
    picks = [router.candidates("m", "chat")[0][0].name for _ in range(400)]
    assert 250 <= picks.count("heavy") <= 350  # 300 expected; 5 standard deviations either side


def test_least_in_flight_prefers_the_idle_provider(make_app, upstream, upstream_b):
    """By weight alone "busy" would always come first; one request in flight there moves all
    later ones to "idle"."""
    upstream.default = lambda r: Hang(3.0)
    app = make_app([provider(upstream.url, "busy", weight=1e6), provider(upstream_b.url, "idle")],
                   routing={"strategy": "least_in_flight"},
                   http_client={"timeout": 5.0, "retry_attempts": 0})
    with live_server(app, threads=6) as url:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            parked = pool.submit(requests.post, url + "/v1/chat/completions", json=CHAT, timeout=10)
            wait_for_calls(upstream, 1)
            picks = {requests.post(url + "/v1/chat/completions", json=CHAT, timeout=10)
                     .headers["X-Proxy-Provider"] for _ in range(10)}
            upstream.stopping.set()
            parked.result()
    assert picks == {"idle"}
