"""An upstream's 429 reaches the client as a 429 (``upstream_rate_limited``, the shortest
Retry-After) when every candidate was rate limited, so clients can tell a rate limit from an
outage; mixed failures stay 502/503/504."""

import json

import pytest

from tests.conftest import FakeClock, provider
from tests.upstream import Reply

CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}


def limited(seconds=None):
    headers = {"Retry-After": str(seconds)} if seconds is not None else {}
    return Reply(429, {"error": {"message": "Rate limit reached", "type": "requests"}},
                 headers=headers)


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def pair(make_app, upstream, upstream_b, clock):
    """a (priority 1) in front of b (priority 2); no retries in place."""
    return make_app([provider(upstream.url, "a", priority=1),
                     provider(upstream_b.url, "b", priority=2)],
                    clock=clock, http_client={"retry_attempts": 0})


def post(app, body=CHAT):
    response = app.test_client().post("/v1/chat/completions", json=body)
    response.get_data()
    response.close()
    return response


def assert_rate_limited(response, retry_after):
    assert response.status_code == 429, response.get_data(as_text=True)
    assert response.headers["Retry-After"] == str(retry_after)
    error = json.loads(response.get_data())["error"]
    assert error["code"] == "upstream_rate_limited" and error["type"] == "rate_limit_error"
    assert set(error) == {"message", "type", "param", "code"}


def test_the_only_providers_429_is_a_429_with_its_retry_after(make_app, upstream):
    app = make_app([provider(upstream.url)], http_client={"retry_attempts": 0})
    upstream.script(limited(7))
    assert_rate_limited(post(app), 7)


def test_every_candidate_rate_limited_is_a_429_with_the_shortest_retry_after(
        pair, upstream, upstream_b):
    upstream.script(limited(30))
    upstream_b.script(limited(5))
    assert_rate_limited(post(pair), 5)
    assert (upstream.calls, upstream_b.calls) == (1, 1)


def test_candidates_cooling_down_after_a_429_are_a_429_without_a_call(
        pair, upstream, upstream_b, clock):
    upstream.script(limited(30))
    upstream_b.script(limited(5))
    post(pair)
    clock.advance(2)
    assert_rate_limited(post(pair), 3)  # b's cool-down ends first
    assert (upstream.calls, upstream_b.calls) == (1, 1)
    clock.advance(3)
    assert post(pair).status_code == 200  # b is tried again
    assert (upstream.calls, upstream_b.calls) == (1, 2)


def test_a_429_without_retry_after_is_a_429_retry_after_1(pair, upstream, upstream_b):
    upstream.script(limited())
    upstream_b.script(limited())
    assert_rate_limited(post(pair), 1)


def test_a_rate_limit_and_a_failure_stay_a_502(pair, upstream, upstream_b):
    upstream.script(limited(5))
    upstream_b.script(Reply(500, {"error": {"message": "down"}}))
    response = post(pair)
    assert response.status_code == 502
    assert json.loads(response.get_data())["error"]["code"] == "upstream_error"


def test_a_rate_limit_and_an_open_circuit_stay_a_503(make_app, upstream, upstream_b, clock):
    app = make_app([provider(upstream.url, "a", priority=1),
                    provider(upstream_b.url, "b", priority=2)], clock=clock,
                   http_client={"retry_attempts": 0},
                   circuit_breaker={"failure_threshold": 1, "adaptive_thresholds": False})
    upstream.script(limited(5))
    upstream_b.script(Reply(500, {}))
    assert post(app).status_code == 502  # b's breaker opens; a cools down
    response = post(app)
    assert response.status_code == 503
    assert json.loads(response.get_data())["error"]["code"] == "no_provider_available"


def test_a_rate_limited_stream_is_a_429_before_its_first_event(pair, upstream, upstream_b):
    upstream.script(limited(4))
    upstream_b.script(limited(9))
    response = post(pair, {**CHAT, "stream": True})
    assert_rate_limited(response, 4)
    assert response.mimetype == "application/json"


def test_a_429_is_a_rate_limit_not_a_fault_it_never_opens_the_breaker(pair, upstream, clock):
    for _ in range(10):
        upstream.script(limited())
        assert post(pair).headers["X-Proxy-Provider"] == "b"
        clock.advance(1)  # past the cool-down
    state = pair.test_client().get("/providers").json["providers"][0]["circuit_breaker"]
    assert state["state"] == "closed" and state["failures"] == 0
