"""Per-key limits that hold when tenants share the proxy: tokens reserved at admission so
concurrent requests cannot overspend a key, each worker's share of every limit when workers
keep their own counts, and each key's default share of the proxy's request slots."""

from __future__ import annotations

import concurrent.futures
import hashlib
import random
import threading
import time

import pytest
import requests

from app.auth import Tenant
from app.cache.condense import Condenser
from app.pipeline.limits import MemoryLimitStore, RateLimited, RateLimiter, WorkerShare
from app.providers import Call
from app.state.limits import RedisLimitStore
from app.state.store import connect
from settings import SettingsError, build_settings
from tests.conftest import FakeClock, live_server, provider, wait_for_calls
from tests.upstream import Reply, Stream, chat_chunks, chat_completion

KEY_A, KEY_B = "sk-team-a-0123456789abcdef", "sk-team-b-0123456789abcdef"
COUNT = Condenser(None).estimate_tokens  # the prompt estimate the pipeline reserves with


def sha(key):
    return hashlib.sha256(key.encode()).hexdigest()


def bearer(key):
    return {"Authorization": f"Bearer {key}"}


def chat(content="hi", **fields):
    return {"model": "gpt-test", "messages": [{"role": "user", "content": content}], **fields}


def refusal(call, *args, **kwargs) -> RateLimited:
    with pytest.raises(RateLimited) as caught:
        call(*args, **kwargs)
    return caught.value


# -- tokens reserved at admission (defect 3) ----------------------------------------------------

def test_concurrent_slow_streams_are_admitted_only_as_far_as_the_token_limit_covers(make_app,
                                                                                    upstream):
    """200 tokens a minute; each stream reserves 35 (a 5-token prompt, max_tokens 30): of 12
    streams held open at once, 5 run and 7 get the token-limit 429, where every one used to
    run on the last token. Once they end, the unused reservations come back."""
    gate = threading.Event()
    usage = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
             "model": "gpt-test", "choices": [],
             "usage": {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}}
    upstream.default = lambda r: (Stream(chat_chunks("gpt-test", ["a", "b", "c"])[:-1]
                                         + [usage, b"[DONE]"], delay=0.01, gate=gate)
                                  if r.json().get("stream") else
                                  Reply(body=chat_completion("gpt-test", "ok")))
    app = make_app([provider(upstream.url)], clock=FakeClock(),
                   auth={"api_keys": [{"id": "team-a", "sha256": sha(KEY_A),
                                       "tokens_per_minute": 200}]})
    body = chat(stream=True, max_tokens=30)
    with live_server(app, threads=16) as url:
        def open_stream(_):
            return requests.post(url + "/v1/chat/completions", json=body, headers=bearer(KEY_A),
                                 stream=True, timeout=10)
        try:
            with concurrent.futures.ThreadPoolExecutor(12) as pool:
                answers = list(pool.map(open_stream, range(12)))
            codes = sorted(a.status_code for a in answers)
            assert codes == [200] * 5 + [429] * 7
            refused = next(a for a in answers if a.status_code == 429).json()["error"]
            assert refused["code"] == "rate_limit_exceeded"
            assert "Token limit reached for API key 'team-a': 200 tokens per minute" in \
                refused["message"]
            assert "reserves 35 tokens" in refused["message"]
            assert next(a for a in answers if a.status_code == 429).headers["Retry-After"] == "3"
            assert upstream.calls == 5
        finally:
            gate.set()
            for answer in answers:
                answer.content
                answer.close()

        # Settled to their usage: the unused part of each reservation is back, so the key is
        # admitted again (the clock never moved: nothing refilled). Settling runs as each
        # stream is closed, just after its last byte: wait for it, bounded.
        deadline = time.monotonic() + 5
        while True:
            again = requests.post(url + "/v1/chat/completions", json=chat(max_tokens=30),
                                  headers=bearer(KEY_A), timeout=10)
            if again.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert again.status_code == 200


def test_a_reservation_is_settled_to_the_usage_and_a_refusal_costs_nothing():
    clock = FakeClock()
    limiter = RateLimiter(MemoryLimitStore(), clock=clock)
    who = Tenant("team-a", tokens_per_minute=100)
    first = limiter.admit(who, 40)
    assert first.reserved == 40 and first.headers()["X-RateLimit-Remaining-Tokens"] == "60"
    second = limiter.admit(who, 40)
    error = refusal(limiter.admit, who, 40)          # 20 left: refused, and takes nothing
    assert error.code == "rate_limit_exceeded" and error.headers["Retry-After"] == "12"
    assert "reserves 40 tokens" in error.message and "and 20 are left" in error.message
    assert limiter.charge_tokens(who, 0).remaining == 20
    first.finish(25)                                 # 15 of its 40 come back
    second.finish(70)                                # 30 more than it reserved are charged
    second.finish(70)                                # once only
    assert limiter.charge_tokens(who, 0).remaining == 20 + 15 - 30
    third = limiter.admit(Tenant("team-b", tokens_per_minute=100), 10)
    third.release()                                  # unused: all of it comes back
    assert limiter.charge_tokens(Tenant("team-b", tokens_per_minute=100), 0).remaining == 100


def test_a_refusal_by_a_later_limit_gives_the_reservation_back():
    limiter = RateLimiter(MemoryLimitStore(), clock=FakeClock())
    who = Tenant("team-a", requests_per_minute=1, tokens_per_minute=100, max_in_flight=5)
    limiter.admit(who, 30).release()
    assert refusal(limiter.admit, who, 30).message.startswith("Rate limit reached")
    held = Tenant("team-b", tokens_per_minute=100, max_in_flight=1)
    limiter.admit(held, 30)
    assert refusal(limiter.admit, held, 30).code == "too_many_concurrent_requests"
    assert limiter.charge_tokens(who, 0).remaining == 100
    assert limiter.charge_tokens(held, 0).remaining == 70


def test_an_estimate_over_the_whole_limit_reserves_the_whole_limit():
    """It runs from a full bucket, is charged its real usage, and a refund never overfills."""
    clock = FakeClock()
    limiter = RateLimiter(MemoryLimitStore(), clock=clock)
    who = Tenant("team-a", tokens_per_minute=100)
    big = limiter.admit(who, 5000)
    assert big.reserved == 100
    assert "reserves 100 tokens" in refusal(limiter.admit, who, 5000).message
    clock.advance(60)                                # refilled meanwhile; then nothing used
    big.finish(0)
    assert limiter.charge_tokens(who, 0).remaining == 100
    limiter.admit(who, 5000).finish(300)             # used three times the limit: a debt
    assert limiter.charge_tokens(who, 0).remaining == -200
    assert refusal(limiter.admit, who, 1).headers["Retry-After"] == "121"


def test_the_reservation_is_the_prompt_estimate_plus_the_most_the_answer_may_use():
    limiter = RateLimiter(reserve_completion=500)
    hi = COUNT([{"role": "user", "content": "hi"}])
    assert hi == 5
    assert limiter.reservation(Call("chat", chat()), COUNT) == hi + 500
    assert limiter.reservation(Call("chat", chat(max_tokens=30)), COUNT) == hi + 30
    assert limiter.reservation(Call("chat", chat(max_tokens=30, max_completion_tokens=20, n=3)),
                               COUNT) == hi + 60
    long = "x" * 4000
    assert limiter.reservation(Call("chat", chat(long, max_tokens=1)), COUNT) == 1004 + 1
    assert limiter.reservation(Call("completions", {"model": "m", "prompt": ["ab", "cd"],
                                                    "max_tokens": 7, "best_of": 2}), COUNT) == 24
    assert limiter.reservation(Call("embeddings", {"model": "m", "input": [[1, 2, 3], "abcd"]}),
                               COUNT) == 3 + 5


def test_reservations_on_redis_hold_across_two_processes_and_sixteen_threads(redis_url, prefix):
    """The Lua script reserves atomically: of 160 tries at 35 tokens on a 200-token limit from
    two "processes", exactly 5 are admitted; refusals take nothing; settling gives back."""
    limiters = []
    for _ in range(2):
        _, guard = connect(redis_url, pool_size=16, clock=FakeClock(), timeout=0.5)
        limiters.append(RateLimiter(RedisLimitStore(guard, MemoryLimitStore(), prefix),
                                    clock=FakeClock(1_700_000_000.0)))
    who = Tenant("team-a", tokens_per_minute=200)
    admitted, start = [], threading.Barrier(16)

    def reserve(limiter):
        start.wait(timeout=10)
        for _ in range(10):
            try:
                admitted.append(limiter.admit(who, 35))
            except RateLimited:
                pass

    threads = [threading.Thread(target=reserve, args=(limiters[i % 2],)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(admitted) == 5
    assert limiters[0].charge_tokens(who, 0).remaining == 200 - 5 * 35
    for admission in admitted:
        admission.finish(9)
    assert limiters[1].charge_tokens(who, 0).remaining == 200 - 5 * 9
    assert all(limiter.store.guard.fallbacks == 0 for limiter in limiters)


def test_redis_and_memory_buckets_agree_on_reservations_and_refunds(redis_url, prefix):
    """The same random reservations (need = cost), refunds (negative costs) and charges give
    identical answers from the Lua script and the in-process store; a refund never overfills."""
    rng = random.Random(16)
    _, guard = connect(redis_url, pool_size=4, clock=FakeClock(), timeout=0.5)
    shared, memory = RedisLimitStore(guard, MemoryLimitStore(), prefix), MemoryLimitStore()
    now = 1_700_000_000.5
    for _ in range(300):
        now += rng.choice((0.0, 0.001, 0.5, 3.0, 61.0))
        reserve = rng.randrange(1, 1200)
        cost, need = rng.choice(((reserve, reserve), (-rng.randrange(1, 1500), None),
                                 (rng.randrange(0, 500), None)))
        args = dict(limit=1000, window=60.0, burst=1000, cost=cost, need=need, now=now)
        took = shared.take("tokens:a", **args)
        assert took == memory.take("tokens:a", **args) and took.remaining <= 1000
    assert guard.fallbacks == 0


def test_held_streams_on_two_processes_sharing_redis_reserve_from_one_bucket(make_app, upstream,
                                                                           redis_url, prefix):
    """Two apps on one Redis; streams opened and held: 100 tokens cover 2 of 35 each, whichever
    process they reach; closing one gives its unused tokens back to both."""
    gate = threading.Event()
    upstream.default = lambda r: Stream(chat_chunks("gpt-test", ["a", "b"]), gate=gate)
    apps = [make_app([provider(upstream.url)], redis={"url": redis_url, "prefix": prefix},
                     auth={"api_keys": [{"id": "team-a", "sha256": sha(KEY_A),
                                         "tokens_per_minute": 100}]}) for _ in range(2)]
    body = chat(stream=True, max_tokens=30)
    held = []
    try:
        codes = []
        for i in range(4):
            response = apps[i % 2].test_client().post("/v1/chat/completions", json=body,
                                                      headers=bearer(KEY_A), buffered=False)
            codes.append(response.status_code)
            held.append(response)
        assert codes == [200, 200, 429, 429]
        gate.set()
        held[0].close()                              # settled: its whole reservation back
        later = apps[1].test_client().post("/v1/chat/completions", json=body,
                                           headers=bearer(KEY_A), buffered=False)
        held.append(later)
        assert later.status_code == 200
    finally:
        gate.set()
        for response in held:
            response.close()


# -- each worker's share of every limit (defect 4) ---------------------------------------------

@pytest.mark.parametrize("count", [1, 2, 3, 7])
def test_worker_shares_add_up_to_exactly_the_limit(count):
    for limit in (0, 1, 2, 5, 20, 199, 10_000):
        parts = [WorkerShare(i, count).of(limit) for i in range(count)]
        assert sum(parts) == limit and max(parts) - min(parts) <= 1


def test_a_worker_index_outside_the_workers_is_refused():
    with pytest.raises(ValueError):
        WorkerShare(2, 2)
    with pytest.raises(SettingsError, match="server.worker_index"):
        build_settings({"server": {"workers": 2, "worker_index": 2},
                        "providers": [{"name": "m", "type": "mock", "models": ["m"]}]})


def test_each_worker_enforces_its_share_of_requests_tokens_and_in_flight():
    """Limits 5 requests, 3 tokens, 3 in flight over 2 workers: worker 0 takes 3, 2, 2;
    worker 1 takes 2, 1, 1."""
    who = Tenant("team-a", requests_per_minute=5, tokens_per_minute=3, max_in_flight=3)
    for index, (requests_part, tokens_part, slots) in enumerate([(3, 2, 2), (2, 1, 1)]):
        limiter = RateLimiter(MemoryLimitStore(), clock=FakeClock(), share=WorkerShare(index, 2))
        admitted = 0
        while True:
            try:
                limiter.admit(who).release()
            except RateLimited as error:
                assert "this worker's share of 5: the limit is split over 2 proxy workers" in \
                    error.message
                break
            admitted += 1
        assert admitted == requests_part
        assert limiter.check_tokens(who, 10).taken == tokens_part
        for _ in range(slots):
            limiter.acquire(who)
        assert refusal(limiter.acquire, who).code == "too_many_concurrent_requests"


def test_a_worker_whose_share_is_zero_refuses_the_key_saying_why(make_app, upstream):
    """1 request a minute over 2 workers: worker 1's share is 0; over HTTP it says so."""
    app = make_app([provider(upstream.url)], server={"workers": 2, "worker_index": 1},
                   auth={"api_keys": [{"id": "team-a", "sha256": sha(KEY_A),
                                       "requests_per_minute": 1}]})
    response = app.test_client().post("/v1/chat/completions", json=chat(),
                                      headers=bearer(KEY_A))
    assert response.status_code == 429 and upstream.calls == 0
    error = response.json["error"]
    assert error["code"] == "rate_limit_exceeded" and response.headers["Retry-After"] == "1"
    assert ("split over 2 proxy workers that keep their own counts, and this worker's share of "
            "it is 0") in error["message"]
    first = make_app([provider(upstream.url)], server={"workers": 2, "worker_index": 0},
                     auth={"api_keys": [{"id": "team-a", "sha256": sha(KEY_A),
                                         "requests_per_minute": 3}]})
    ok = first.test_client().post("/v1/chat/completions", json=chat(), headers=bearer(KEY_A))
    assert ok.status_code == 200 and ok.headers["X-RateLimit-Limit"] == "2"


def test_with_redis_every_worker_shares_the_whole_limit(make_app, upstream, redis_url, prefix):
    app = make_app([provider(upstream.url)], server={"workers": 2, "worker_index": 1},
                   redis={"url": redis_url, "prefix": prefix},
                   auth={"api_keys": [{"id": "team-a", "sha256": sha(KEY_A),
                                       "requests_per_minute": 1}]})
    ok = app.test_client().post("/v1/chat/completions", json=chat(), headers=bearer(KEY_A))
    assert ok.status_code == 200 and ok.headers["X-RateLimit-Limit"] == "1"


# -- each key's share of the request slots (defect 5) ------------------------------------------

def held_upstream(upstream):
    """Team a's requests ("a") wait until the returned event is set (10 s at most); the others
    are answered at once."""
    release = threading.Event()

    def behaviour(recorded):
        if recorded.json()["messages"][0]["content"] == "a":
            release.wait(10)
        return Reply(body=chat_completion("gpt-test", "ok"))
    upstream.default = behaviour
    return release


def test_one_key_cannot_take_every_slot_from_another(make_app, upstream):
    """4 request slots, a default share of half: team a's 4 slow requests get 2 slots and 2
    refusals from its own limit (429), and team b is still served (not proxy_overloaded)."""
    release = held_upstream(upstream)
    app = make_app([provider(upstream.url, max_in_flight=10)], routing={"max_in_flight": 4},
                   auth={"api_keys_required": True,
                         "api_keys": [{"id": "team-a", "sha256": sha(KEY_A)},
                                      {"id": "team-b", "sha256": sha(KEY_B)}]})
    with live_server(app, threads=12) as url:
        def post(content, key):
            return requests.post(url + "/v1/chat/completions", json=chat(content),
                                 headers=bearer(key), timeout=15)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            try:
                team_a = [pool.submit(post, "a", KEY_A) for _ in range(4)]
                deadline = time.monotonic() + 10
                while upstream.calls + sum(f.done() for f in team_a) < 4:  # all 4 decided
                    assert time.monotonic() < deadline, "team a's requests were not decided"
                    time.sleep(0.01)
                team_b = post("b", KEY_B)
            finally:
                release.set()
            answers = [f.result() for f in team_a]
    assert team_b.status_code == 200
    assert sorted(a.status_code for a in answers) == [200, 200, 429, 429]
    error = next(a for a in answers if a.status_code == 429).json()["error"]
    assert error["code"] == "too_many_concurrent_requests"
    assert "API key 'team-a': it may have 2 of this proxy's request slots at once" in \
        error["message"]


def test_without_keys_the_anonymous_tenant_keeps_every_slot(make_app, upstream):
    release = held_upstream(upstream)
    app = make_app([provider(upstream.url, max_in_flight=10)], routing={"max_in_flight": 2})
    with live_server(app, threads=8) as url:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            try:
                held = [pool.submit(requests.post, url + "/v1/chat/completions",
                                    json=chat("a"), timeout=15) for _ in range(2)]
                wait_for_calls(upstream, 2)
            finally:
                release.set()
            assert [f.result().status_code for f in held] == [200, 200]


def test_a_keys_own_max_in_flight_overrides_the_share_and_0_is_unlimited():
    s = build_settings({"routing": {"max_in_flight": 10},
                        "auth": {"tenant_in_flight_share": 0.25, "api_keys": [
                            {"id": "own", "sha256": sha(KEY_A), "max_in_flight": 7},
                            {"id": "unlimited", "sha256": sha(KEY_B), "max_in_flight": 0},
                            {"id": "shared", "sha256": sha("sk-shared-0123456789abcdef")}]},
                        "providers": [{"name": "m", "type": "mock", "models": ["m"]}]})
    keys = s.auth.client_keys()
    assert [r.max_in_flight for r in keys.records] == [7, 0, None]
    assert keys.anonymous.max_in_flight is None          # one tenant among the keys
    assert s.auth.in_flight_share(s.max_in_flight) == 2
    limiter = RateLimiter(MemoryLimitStore(), in_flight_share=2)
    for record, allowed in zip(keys.records, (7, 50, 2)):
        tenant = Tenant(record.id, max_in_flight=record.max_in_flight)
        for _ in range(allowed):
            limiter.acquire(tenant)
        if allowed < 50:
            refusal(limiter.acquire, tenant)
    keyless = build_settings({"providers": [{"name": "m", "type": "mock", "models": ["m"]}]})
    assert keyless.auth.client_keys().anonymous.max_in_flight == 0


@pytest.mark.parametrize("share", [-0.1, 1.5])
def test_the_in_flight_share_must_be_a_fraction(share):
    with pytest.raises(SettingsError, match="auth.tenant_in_flight_share"):
        build_settings({"auth": {"tenant_in_flight_share": share},
                        "providers": [{"name": "m", "type": "mock", "models": ["m"]}]})
