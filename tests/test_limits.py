"""Per-key rate limits: exact edges on a fake clock, burst and refill, tokens charged after the
answer, the X-RateLimit-* headers, in-flight limits, concurrent use, and a bounded store."""

from __future__ import annotations

import threading

import pytest
from flask import Flask, jsonify, request

from app.api import error_response
from app.auth import Tenant
from app.errors import ProxyError
from app.pipeline.limits import Decision, MemoryLimitStore, RateLimited, RateLimiter
from tests.conftest import FakeClock


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def store():
    return MemoryLimitStore()


@pytest.fixture
def limiter(store, clock):
    return RateLimiter(store, clock=clock)


def tenant(rpm=None, tpm=None, in_flight=None, name="team-a"):
    return Tenant(name, requests_per_minute=rpm, tokens_per_minute=tpm, max_in_flight=in_flight)


def admitted_now(limiter, who) -> int:
    """How many requests are admitted back to back before the first refusal."""
    count = 0
    while True:
        try:
            limiter.check_request(who)
        except RateLimited:
            return count
        count += 1


def refusal(call, *args) -> RateLimited:
    with pytest.raises(RateLimited) as caught:
        call(*args)
    return caught.value


# -- requests per minute ------------------------------------------------------------------------

def test_n_requests_are_admitted_and_the_next_waits_exactly_one_interval(limiter, clock):
    """Limit 10/min: 10 at once, then the 11th is told 6 s, refused at 5.999 s, admitted at 6 s."""
    who = tenant(rpm=10)
    assert admitted_now(limiter, who) == 10
    error = refusal(limiter.check_request, who)
    assert (error.status, error.type, error.code) == (
        429, "rate_limit_error", "rate_limit_exceeded")
    assert error.headers["Retry-After"] == "6"
    assert "API key 'team-a'" in error.message and "10 requests per minute" in error.message
    clock.advance(5.999)
    assert refusal(limiter.check_request, who).headers["Retry-After"] == "1"
    clock.advance(0.001)
    assert admitted_now(limiter, who) == 1


def test_retry_after_rounds_up_so_waiting_that_long_is_enough(limiter, clock):
    who = tenant(rpm=7)  # one request every 60/7 = 8.57 s
    assert admitted_now(limiter, who) == 7
    assert refusal(limiter.check_request, who).headers["Retry-After"] == "9"
    clock.advance(8.57)
    refusal(limiter.check_request, who)
    clock.advance(9 - 8.57)
    assert admitted_now(limiter, who) == 1


def test_burst_is_one_windows_allowance_and_refills_evenly(limiter, clock):
    who = tenant(rpm=10)
    assert admitted_now(limiter, who) == 10
    clock.advance(30)
    assert admitted_now(limiter, who) == 5   # half a window refills half the bucket
    clock.advance(3600)
    assert admitted_now(limiter, who) == 10  # an idle hour still refills only to the burst


def test_steady_traffic_gets_the_exact_rate_with_no_drift(store):
    """Trying every 0.1 s for 10 minutes at 7/min admits the burst plus exactly 70, not 69."""
    start = 1000.0
    clock = FakeClock(start)
    limiter = RateLimiter(store, clock=clock)
    who = tenant(rpm=7)
    total = 0
    for step in range(6001):
        clock.now = start + step / 10
        total += admitted_now(limiter, who)
    assert total == 7 + 70


def test_a_refused_request_costs_nothing(limiter, clock):
    who = tenant(rpm=2)
    assert admitted_now(limiter, who) == 2
    for _ in range(50):
        refusal(limiter.check_request, who)
    clock.advance(30)
    assert admitted_now(limiter, who) == 1


def test_keys_have_separate_buckets_and_a_custom_window(store, clock):
    limiter = RateLimiter(store, clock=clock, window=1.0)
    a, b = tenant(rpm=3, name="a"), tenant(rpm=3, name="b")
    assert admitted_now(limiter, a) == 3
    assert admitted_now(limiter, b) == 3
    error = refusal(limiter.check_request, a)
    assert "3 requests per 1 s" in error.message and error.headers["Retry-After"] == "1"
    clock.advance(1)
    assert admitted_now(limiter, a) == 3


def test_zero_or_none_is_unlimited_without_headers_or_state(limiter, store):
    for who in (tenant(), tenant(rpm=0, tpm=0, in_flight=0)):
        for _ in range(1000):
            admission = limiter.admit(who)
            assert admission.headers() == {}
            limiter.charge_tokens(who, 10**9)
            admission.release()
    assert len(store) == 0


# -- headers ------------------------------------------------------------------------------------

def test_success_headers_give_limit_remaining_and_seconds_until_full(limiter, clock):
    who = tenant(rpm=10)
    assert limiter.check_request(who).headers() == {
        "X-RateLimit-Limit": "10", "X-RateLimit-Remaining": "9", "X-RateLimit-Reset": "6"}
    for _ in range(8):
        limiter.check_request(who)
    assert limiter.check_request(who).headers() == {
        "X-RateLimit-Limit": "10", "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "60"}
    clock.advance(31)  # 5.17 units back; one taken: 4.17 left, 5.83 missing = 35 s to full
    assert limiter.check_request(who).headers() == {
        "X-RateLimit-Limit": "10", "X-RateLimit-Remaining": "4", "X-RateLimit-Reset": "35"}


def test_refusal_headers_add_retry_after_until_the_next_admission(limiter, clock):
    who = tenant(rpm=10)
    admitted_now(limiter, who)
    clock.advance(2.5)
    assert refusal(limiter.check_request, who).headers == {
        "X-RateLimit-Limit": "10", "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "58",
        "Retry-After": "4"}


def test_decision_headers_round_remaining_down_and_times_up():
    decision = Decision("tokens", False, 100, remaining=-3.5, retry_after=0.2, reset_after=61.01)
    assert decision.headers() == {
        "X-RateLimit-Limit-Tokens": "100", "X-RateLimit-Remaining-Tokens": "0",
        "X-RateLimit-Reset-Tokens": "62", "Retry-After": "1"}
    assert Decision("requests", True, None).headers() == {}


# -- tokens per minute --------------------------------------------------------------------------

def test_tokens_are_admitted_while_any_budget_is_left_and_charged_after_the_answer(limiter, clock):
    who = tenant(tpm=1000)
    assert limiter.check_tokens(who).headers() == {
        "X-RateLimit-Limit-Tokens": "1000", "X-RateLimit-Remaining-Tokens": "1000",
        "X-RateLimit-Reset-Tokens": "0"}
    limiter.charge_tokens(who, 999)
    limiter.check_tokens(who)                     # one token left: still admitted
    after = limiter.charge_tokens(who, 501)       # the answer was long: 500 in debt
    assert (after.remaining, after.headers()["X-RateLimit-Reset-Tokens"]) == (-500, "90")
    error = refusal(limiter.check_tokens, who)
    assert (error.status, error.code) == (429, "rate_limit_exceeded")
    assert "1000 tokens per minute" in error.message
    assert error.headers["Retry-After"] == "31"   # 501 tokens at 1000/min: 30.06 s
    clock.advance(30.05)
    refusal(limiter.check_tokens, who)
    clock.advance(0.01)
    assert limiter.check_tokens(who).headers()["X-RateLimit-Remaining-Tokens"] == "1"


def test_checking_tokens_takes_none(limiter):
    who = tenant(tpm=10)
    for _ in range(100):
        limiter.check_tokens(who)
    assert limiter.check_tokens(who).remaining == 10


def test_charging_never_raises_and_ignores_negative_counts(limiter):
    who = tenant(tpm=10)
    for _ in range(5):
        limiter.charge_tokens(who, 100)
    assert limiter.charge_tokens(who, -50).remaining == -490


# -- in flight ----------------------------------------------------------------------------------

def test_in_flight_limit_refuses_past_the_limit_and_frees_on_release(limiter, store):
    who = tenant(in_flight=2)
    limiter.acquire(who)
    limiter.acquire(who)
    error = refusal(limiter.acquire, who)
    assert (error.status, error.type, error.code) == (
        429, "rate_limit_error", "too_many_concurrent_requests")
    assert error.headers == {"Retry-After": "1"}
    limiter.release(who)
    limiter.acquire(who)
    for _ in range(5):
        limiter.release(who)                      # extra releases do not make room
    assert len(store) == 0
    limiter.acquire(who)
    limiter.acquire(who)
    refusal(limiter.acquire, who)


def test_admit_takes_nothing_when_refused_and_releases_once(limiter, store):
    who = tenant(rpm=1, tpm=100, in_flight=1)
    first = limiter.admit(who)
    assert first.headers() == {
        "X-RateLimit-Limit": "1", "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "60",
        "X-RateLimit-Limit-Tokens": "100", "X-RateLimit-Remaining-Tokens": "100",
        "X-RateLimit-Reset-Tokens": "0"}
    assert refusal(limiter.admit, who).code == "too_many_concurrent_requests"
    first.release()
    first.release()
    assert refusal(limiter.admit, who).code == "rate_limit_exceeded"
    limiter.acquire(who)                          # the refused admit gave its slot back
    limiter.release(who)
    limiter.charge_tokens(who, 200)
    spent = store.take("requests:team-a", limit=1, window=60, burst=1, cost=0, need=None,
                       now=1000.0)
    assert spent.remaining == 0                   # token refusals spend no request


# -- concurrency --------------------------------------------------------------------------------

def run_threads(count, target):
    start = threading.Barrier(count)
    errors = []

    def body():
        start.wait()
        try:
            target()
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=body) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors


@pytest.mark.parametrize("limit", [1, 37, 200])
def test_sixteen_threads_on_one_limit_admit_exactly_the_limit(limiter, limit):
    who = tenant(rpm=limit)
    admitted = []

    def hammer():
        mine = 0
        for _ in range(40):
            try:
                limiter.check_request(who)
                mine += 1
            except RateLimited:
                pass
        admitted.append(mine)

    run_threads(16, hammer)
    assert sum(admitted) == limit


def test_sixteen_threads_acquiring_at_once_get_exactly_the_in_flight_limit(limiter):
    who = tenant(in_flight=3)
    held = []

    def grab():
        for _ in range(10):
            try:
                limiter.acquire(who)
                held.append(1)
            except RateLimited:
                pass

    run_threads(16, grab)
    assert len(held) == 3


def test_sixteen_threads_never_hold_more_than_the_in_flight_limit(limiter):
    who = tenant(in_flight=3)
    lock = threading.Lock()
    state = {"now": 0, "peak": 0, "refused": 0}

    def work():
        for _ in range(200):
            try:
                limiter.acquire(who)
            except RateLimited:
                with lock:
                    state["refused"] += 1
                continue
            with lock:
                state["now"] += 1
                state["peak"] = max(state["peak"], state["now"])
            with lock:
                state["now"] -= 1
            limiter.release(who)

    run_threads(16, work)
    assert state["peak"] <= 3
    limiter.acquire(who)
    limiter.acquire(who)
    limiter.acquire(who)                          # every slot came back
    refusal(limiter.acquire, who)


def test_concurrent_charges_all_count(limiter):
    who = tenant(tpm=1000)

    def charge():
        for _ in range(100):
            limiter.charge_tokens(who, 1)

    run_threads(16, charge)
    assert limiter.charge_tokens(who, 0).remaining == 1000 - 1600


# -- memory -------------------------------------------------------------------------------------

def test_idle_keys_are_pruned_so_the_store_stays_bounded(limiter, store, clock):
    debtor = tenant(tpm=100, name="debtor")
    limiter.charge_tokens(debtor, 1000)           # 10 minutes of debt
    for i in range(5000):
        limiter.check_request(tenant(rpm=60, name=f"k{i}"))
    assert len(store) == 5001
    clock.advance(61)                             # everyone is full again, past a sweep
    limiter.check_request(tenant(rpm=60, name="late"))
    assert len(store) == 2                        # the debt is kept, not forgiven
    assert limiter.charge_tokens(debtor, 0).remaining == pytest.approx(-900 + 61 * 100 / 60)
    clock.advance(600)
    limiter.check_request(tenant(rpm=60, name="later"))
    assert len(store) == 1


def test_a_full_bucket_is_not_stored(limiter, store):
    limiter.check_tokens(tenant(tpm=50))
    assert len(store) == 0


# -- over HTTP ----------------------------------------------------------------------------------

def test_headers_over_http_on_answers_and_on_the_429(limiter, clock):
    """A Flask app wired the way the proxy will be: admit, answer, charge, release."""
    who = tenant(rpm=2, tpm=1000)
    app = Flask(__name__)
    app.register_error_handler(ProxyError, error_response)

    @app.post("/v1/chat/completions")
    def chat():
        admission = limiter.admit(who)
        try:
            response = jsonify(usage={"total_tokens": request.json["tokens"]})
        finally:
            admission.release()
        limiter.charge_tokens(who, request.json["tokens"])
        response.headers.update(admission.headers())
        return response

    client = app.test_client()
    ok = client.post("/v1/chat/completions", json={"tokens": 400})
    assert ok.status_code == 200
    assert (ok.headers["X-RateLimit-Limit"], ok.headers["X-RateLimit-Remaining"],
            ok.headers["X-RateLimit-Reset"]) == ("2", "1", "30")
    assert ok.headers["X-RateLimit-Remaining-Tokens"] == "1000"  # as admitted, before charging
    assert "Retry-After" not in ok.headers
    client.post("/v1/chat/completions", json={"tokens": 400})
    refused = client.post("/v1/chat/completions", json={"tokens": 10})
    assert refused.status_code == 429
    assert refused.json["error"]["type"] == "rate_limit_error"
    assert refused.json["error"]["code"] == "rate_limit_exceeded"
    assert (refused.headers["Retry-After"], refused.headers["X-RateLimit-Remaining"],
            refused.headers["X-RateLimit-Reset"]) == ("30", "0", "60")
    clock.advance(30)
    again = client.post("/v1/chat/completions", json={"tokens": 10})
    assert again.status_code == 200
    assert again.headers["X-RateLimit-Remaining-Tokens"] == "700"  # 800 spent, 500 back in 30 s
