"""Shared state in Redis: caches, rate limits and breakers seen by several processes, and the
fall back to in-process stores while Redis is away.

Runs against the Redis on 127.0.0.1:6379 (``TEST_REDIS_URL`` to change it): skipped when it is
unreachable, unless ``CI=true``, where that fails. Each test uses its own key prefix and deletes
its keys afterwards. "Two processes" are two sets of objects with their own clients and guards.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import threading
import time

import pytest
import redis

from app.pipeline.breakers import OPEN, BreakerBoard
from app.cache import ByteCache
from app.pipeline.limits import MemoryLimitStore
from app.state.breakers import redis_breaker_storage
from app.state.limits import RedisLimitStore
from app.state.store import RedisByteCache, RedisGuard, connect, pack
from settings import CircuitBreakerSettings
from tests.conftest import FakeClock
from tests.processes import free_port

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
DEAD_URL = "redis://127.0.0.1:1/0"
ONE_STRIKE = CircuitBreakerSettings(failure_threshold=1, adaptive_thresholds=False)


@pytest.fixture
def raw(redis_url):
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def process(url, clock=None, **guard):
    """One "process": its own client and guard."""
    client, g = connect(url, pool_size=16, clock=clock or FakeClock(1_700_000_000.0), timeout=0.5)
    if guard:
        g = RedisGuard(client, clock=clock or FakeClock(1_700_000_000.0), **guard)
    return client, g


def cache(guard, prefix, clock, name="response", ttl=10.0, stale_ttl=5.0, max_bytes=1 << 20):
    local = ByteCache(name, 100, ttl, max_bytes, clock=clock, stale_ttl=stale_ttl)
    return RedisByteCache(name, guard, local, ttl=ttl, stale_ttl=stale_ttl, max_bytes=max_bytes,
                          prefix=prefix, clock=clock, local_clock=clock, count_interval=0)


# -- caches ------------------------------------------------------------------------------------

def test_two_processes_see_each_others_cache_entries(redis_url, prefix):
    clock = FakeClock(1_700_000_000.0)
    a = cache(process(redis_url)[1], prefix, clock)
    b = cache(process(redis_url)[1], prefix, clock)
    assert a.set("k", b"answer")
    assert b.get("k").value == b"answer"
    assert len(a) == len(b) == 1
    assert b.delete("k")
    assert a.get("k") is None
    assert a.stats()["misses"] == 1 and b.stats()["hits"] == 1
    assert a.stats()["backend"] == "redis" and a.stats()["fallbacks"] == 0


def test_freshness_max_age_and_stale_window_follow_the_injected_clock(redis_url, prefix, raw):
    clock = FakeClock(1_700_000_000.0)
    c = cache(process(redis_url)[1], prefix, clock, ttl=10.0, stale_ttl=5.0)
    c.set("k", b"v")
    assert 14_000 < raw.pttl(prefix + "cache:response:k") <= 15_000  # Redis drops it after ttl+stale
    clock.advance(4)
    entry = c.get("k")
    assert entry.value == b"v" and entry.age(clock()) == pytest.approx(4)
    assert c.get("k", max_age=3) is None
    clock.advance(7)  # age 11: stale
    assert c.get("k") is None
    assert c.get_stale("k").value == b"v"
    clock.advance(5)  # age 16: past the stale window
    assert c.get_stale("k") is None
    stats = c.stats()
    assert (stats["hits"], stats["misses"], stats["stale_hits"]) == (1, 2, 1)


def test_large_values_are_stored_compressed_and_read_back_intact(redis_url, prefix, raw):
    clock = FakeClock(1_700_000_000.0)
    c = cache(process(redis_url)[1], prefix, clock)
    text = b'{"choices":[{"message":{"content":"' + b"the answer is forty-two. " * 800 + b'"}}]}'
    noise = random.Random(1).randbytes(4096)
    for key, value in (("big", text), ("small", b"tiny"), ("noise", noise)):
        assert c.set(key, value)
        assert c.get(key).value == value
    stored = raw.get(prefix + "cache:response:big")
    assert stored[0] == 1 and len(stored) < len(text) // 10
    assert raw.get(prefix + "cache:response:small")[0] == 0  # under 1 KB: raw
    assert raw.get(prefix + "cache:response:noise")[0] == 0  # does not compress: raw
    assert len(pack(noise, 0.0)) == len(noise) + 9


def test_a_value_over_the_byte_budget_is_refused_and_drops_the_old_one(redis_url, prefix):
    clock = FakeClock(1_700_000_000.0)
    c = cache(process(redis_url)[1], prefix, clock, max_bytes=2000)
    assert c.set("k", b"small")
    assert not c.set("k", b"x" * 5000)
    assert c.get("k") is None and c.stats()["rejected"] == 1


def test_clear_drops_this_cache_only(redis_url, prefix):
    clock = FakeClock(1_700_000_000.0)
    guard = process(redis_url)[1]
    response, summary = cache(guard, prefix, clock), cache(guard, prefix, clock, name="summary")
    for i in range(1200):  # more than one SCAN/UNLINK batch
        response.set(f"r{i}", b"x")
    summary.set("s", b"y")
    response.clear()
    assert len(response) == 0 and response.get("r1") is None
    assert summary.get("s").value == b"y"


# -- rate limits -------------------------------------------------------------------------------

def test_a_limit_of_n_admits_exactly_n_across_two_processes_and_sixteen_threads(redis_url,
                                                                                prefix):
    stores = [RedisLimitStore(process(redis_url, timeout=None)[1], MemoryLimitStore(), prefix)
              for _ in range(2)]
    now = 1_700_000_000.0
    admitted, start = [], threading.Barrier(16)

    def hammer(store):
        start.wait(timeout=10)
        for _ in range(25):
            took = store.take("requests:t", limit=60, window=60.0, burst=60, cost=1, need=1,
                              now=now)
            admitted.append(took.allowed)

    threads = [threading.Thread(target=hammer, args=(stores[i % 2],)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(admitted) == 400 and sum(admitted) == 60
    refused = stores[0].take("requests:t", limit=60, window=60.0, burst=60, cost=1, need=1,
                             now=now)
    assert not refused.allowed and refused.retry_after == 1.0 and refused.reset_after == 60.0
    later = stores[1].take("requests:t", limit=60, window=60.0, burst=60, cost=1, need=1,
                           now=now + 1.0)
    assert later.allowed and later.remaining == 0
    assert all(s.guard.fallbacks == 0 for s in stores)


def test_redis_buckets_decide_exactly_as_the_memory_store(redis_url, prefix):
    """The same random sequence of takes and charges gives identical answers in both stores."""
    rng = random.Random(8)
    shared = RedisLimitStore(process(redis_url)[1], MemoryLimitStore(), prefix)
    memory = MemoryLimitStore()
    now = 1_700_000_000.123456
    for _ in range(400):
        now += rng.choice((0.0, 0.001, 0.37, 1.0, 7.5, 61.0))
        key = rng.choice(("requests:a", "tokens:a"))
        limit = 7 if key.startswith("requests") else 1000
        cost, need = rng.choice(((1, 1), (0, 1), (rng.randrange(0, 900), None)))
        args = dict(limit=limit, window=60.0, burst=limit, cost=cost, need=need, now=now)
        assert shared.take(key, **args) == memory.take(key, **args)


def test_a_full_bucket_leaves_no_key_and_a_used_one_expires_when_full(redis_url, prefix, raw):
    store = RedisLimitStore(process(redis_url)[1], MemoryLimitStore(), prefix)
    args = dict(limit=10, window=60.0, burst=10, need=1)
    store.take("requests:k", cost=1, now=100.0, **args)
    assert 5_000 < raw.pttl(prefix + "limit:requests:k") <= 6_000  # one unit refills in 6 s
    store.take("requests:k", cost=0, now=200.0, **args)  # full again: nothing to keep
    assert raw.exists(prefix + "limit:requests:k") == 0


def test_in_flight_slots_are_shared_never_negative_and_leased(redis_url, prefix):
    clock = FakeClock(1_700_000_000.0)
    a = RedisLimitStore(process(redis_url)[1], MemoryLimitStore(), prefix, lease=30, clock=clock)
    b = RedisLimitStore(process(redis_url)[1], MemoryLimitStore(), prefix, lease=30, clock=clock)
    assert a.enter("in_flight:t", 2) == (True, 1)
    assert b.enter("in_flight:t", 2) == (True, 2)
    assert a.enter("in_flight:t", 2) == (False, 2)
    b.leave("in_flight:t")
    b.leave("in_flight:t")  # held nothing more: no effect
    assert a.enter("in_flight:t", 2) == (True, 2)
    clock.advance(31)  # "process" a crashed holding two slots: their leases run out
    assert b.enter("in_flight:t", 2) == (True, 1)


# -- breakers ----------------------------------------------------------------------------------

def test_a_breaker_opened_in_one_process_is_open_in_another(redis_url, prefix):
    boards = []
    for _ in range(2):
        client, guard = process(redis_url)
        boards.append(BreakerBoard(
            ["openai"], CircuitBreakerSettings(failure_threshold=2, adaptive_thresholds=False),
            clock=FakeClock(1_700_000_000.0),
            storage_factory=lambda name: redis_breaker_storage(client, name, prefix,
                                                               guard=guard, max_age=0)))
    one, other = boards[0].get("openai"), boards[1].get("openai")
    for _ in range(2):
        assert one.allow()
        one.record_failure()
    assert one.state == OPEN and other.state == OPEN and not other.allow()
    one.reset()
    assert other.state == "closed" and other.allow()


# -- Redis away --------------------------------------------------------------------------------

def test_a_dead_redis_degrades_to_local_stores_without_raising():
    prefix, clock = "llmproxy-test:dead:", FakeClock(1_700_000_000.0)
    client, guard = connect(DEAD_URL, pool_size=4, clock=clock, timeout=0.2,
                            failure_threshold=3, recovery_timeout=5.0)
    c = cache(guard, prefix, clock)
    limits = RedisLimitStore(guard, MemoryLimitStore(), prefix)
    board = BreakerBoard(["openai"], ONE_STRIKE, clock=clock,
                         storage_factory=lambda n: redis_breaker_storage(client, n, prefix,
                                                                         guard=guard))
    started = time.perf_counter()
    assert c.set("k", b"v") and c.get("k").value == b"v"
    took = [limits.take("requests:t", limit=2, window=60.0, burst=2, cost=1, need=1, now=1.0)
            for _ in range(3)]
    assert [t.allowed for t in took] == [True, True, False]
    breaker = board.get("openai")
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.state == OPEN  # kept in memory
    assert time.perf_counter() - started < 2.0
    assert guard.state == OPEN and guard.errors == 3  # no connection tried once open
    assert guard.fallbacks > guard.errors and c.stats()["fallbacks"] >= 2
    assert c.stats()["entries"] == 1  # the local count


@pytest.fixture
def private_redis(tmp_path):
    """A throwaway redis-server on a free port, which the test may stop and start again."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    port = free_port()
    procs = []

    def start():
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(tmp_path), "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(proc)
        probe = redis.Redis(port=port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                probe.ping()
                return
            except redis.RedisError:
                time.sleep(0.02)
        raise RuntimeError("private redis-server did not start")

    def stop():
        procs[-1].kill()
        procs[-1].wait(timeout=5)

    start()
    yield f"redis://127.0.0.1:{port}/0", start, stop
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)


def test_stores_fall_back_while_redis_is_down_and_return_when_it_is_back(private_redis):
    url, start, stop = private_redis  # a private server, thrown away after the test
    prefix, clock = "llmproxy-test:private:", FakeClock(1_700_000_000.0)
    client, guard = connect(url, pool_size=4, clock=clock, timeout=0.2, failure_threshold=2,
                            recovery_timeout=5.0)
    c = cache(guard, prefix, clock)
    limits = RedisLimitStore(guard, MemoryLimitStore(), prefix)
    storage = redis_breaker_storage(client, "openai", prefix, guard=guard)
    board = BreakerBoard(["openai"], ONE_STRIKE, clock=clock,
                         storage_factory=lambda name: storage)
    assert c.set("before", b"1") and c.get("before").value == b"1"
    board.get("openai").record_failure()  # open, in Redis
    stop()
    assert c.get("before") is None  # Redis's entries are out of reach: a miss, no error
    assert c.set("during", b"2") and c.get("during").value == b"2"  # served locally
    assert limits.take("requests:t", limit=5, window=60.0, burst=5, cost=1, need=1,
                       now=1.0).allowed
    assert board.get("openai").state == OPEN  # the last state known, from memory
    assert guard.state == OPEN and guard.errors == 2 and guard.fallbacks >= 4
    start()  # empty, on the same port
    assert c.get("before") is None and guard.state == OPEN  # still open: not tried yet
    clock.advance(5.0)
    assert c.set("after", b"3")  # the half-open trial goes to Redis and closes the guard
    assert guard.state == "closed"
    assert redis.Redis.from_url(url).get(prefix + "cache:response:after") is not None
    assert board.get("openai").state == OPEN  # the lost state put back from memory


def test_the_guard_sends_one_trial_after_recovery_and_treats_slow_answers_as_failures(
        redis_url):
    clock = FakeClock(1_700_000_000.0)
    client = redis.Redis.from_url(redis_url)
    guard = RedisGuard(client, clock=clock, failure_threshold=2, recovery_timeout=5.0,
                       timeout=0.02)

    def slow(c):
        clock.advance(0.03)  # the call takes longer than the guard's timeout, by its clock
        return c.ping()

    assert guard.run(slow, lambda: "local") is True  # slow, but its answer is used
    assert guard.run(slow, lambda: "local") is True
    assert guard.state == OPEN and guard.stats()["slow"] == 2
    calls = []
    assert guard.run(lambda c: calls.append(1), lambda: "local") == "local"
    assert calls == [] and guard.fallbacks == 1  # open: Redis is not touched
    clock.advance(5.0)
    assert guard.run(lambda c: c.ping(), lambda: "local") is True  # the half-open trial
    assert guard.state == "closed"
    client.close()
