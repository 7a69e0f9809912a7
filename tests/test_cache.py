"""ByteCache, request_key, build_caches and Coalescer, on a fake clock (no sleeping)."""

from __future__ import annotations

import random
import threading

import pytest

from app.cache import (ENTRY_OVERHEAD, ByteCache, CacheSet, Coalescer, build_caches,
                       entry_size, request_key)
from tests.conftest import FakeClock


@pytest.fixture
def clock():
    return FakeClock()


def make(clock, maxsize=100, ttl=10, max_bytes=1_000_000, stale_ttl=0.0):
    return ByteCache("test", maxsize, ttl, max_bytes, clock=clock, stale_ttl=stale_ttl)


def test_entry_holds_value_store_time_and_age(clock):
    cache = make(clock)
    assert cache.set("k", b"v")
    clock.advance(3)
    entry = cache.get("k")
    assert entry.value == b"v"
    assert entry.stored_at == 1000.0
    assert entry.age(clock()) == 3
    assert entry.size == len("k") + 1 + ENTRY_OVERHEAD


def test_entry_expires_at_ttl_and_is_counted_once(clock):
    cache = make(clock, ttl=10)
    cache.set("k", b"v")
    clock.advance(9.999)
    assert cache.get("k") is not None
    clock.advance(0.001)
    assert cache.get("k") is None
    stats = cache.stats()
    assert (stats["entries"], stats["bytes"], stats["expirations"]) == (0, 0, 1)
    assert stats["evictions"] == 0


def test_set_again_restarts_the_ttl(clock):
    cache = make(clock, ttl=10)
    cache.set("k", b"one")
    clock.advance(8)
    cache.set("k", b"two")
    clock.advance(8)
    assert cache.get("k").value == b"two"
    assert cache.stats()["bytes"] == entry_size("k", b"two")


def test_least_recently_used_entry_is_evicted_first_and_a_hit_refreshes_recency(clock):
    cache = make(clock, maxsize=3)
    for key in "abc":
        cache.set(key, b"x")
    assert cache.get("a") is not None  # a is now the most recent; b is the oldest
    cache.set("d", b"x")
    assert cache.get("b") is None
    assert [k for k in "acd" if cache.get(k)] == ["a", "c", "d"]
    assert cache.stats()["evictions"] == 1


def test_entry_bound_holds_exactly(clock):
    cache = make(clock, maxsize=50)
    for i in range(500):
        cache.set(f"k{i}", b"x" * 10)
        assert len(cache) <= 50
    stats = cache.stats()
    assert stats["entries"] == 50
    assert stats["evictions"] == 450
    assert [i for i in range(500) if cache.get_stale(f"k{i}")] == list(range(450, 500))


def test_byte_budget_holds_with_large_values(clock):
    budget = 10 * (1000 + 2 + ENTRY_OVERHEAD)  # exactly ten 1000-byte values under 2-char keys
    cache = make(clock, maxsize=1000, max_bytes=budget)
    for i in range(40):
        assert cache.set(f"{i:02d}", bytes(1000))
        assert cache.stats()["bytes"] <= budget
    stats = cache.stats()
    assert (stats["entries"], stats["bytes"], stats["evictions"]) == (10, budget, 30)
    big = bytes(4000)
    cache.set("big", big)  # 4323 accounted bytes: four 1322-byte entries must go, no more
    stats = cache.stats()
    assert stats["bytes"] == 6 * 1322 + 4323 <= budget
    assert stats["entries"] == 7
    assert stats["evictions"] == 34
    assert cache.get("big").value == big


def test_replacing_a_value_accounts_the_size_difference(clock):
    cache = make(clock)
    cache.set("k", bytes(5000))
    cache.set("k", bytes(10))
    assert cache.stats()["bytes"] == entry_size("k", bytes(10))
    assert cache.stats()["entries"] == 1


def test_oversize_value_is_refused_cleanly_and_counted(clock):
    cache = make(clock, max_bytes=2000)
    cache.set("small", b"x")
    assert cache.set("huge", bytes(5000)) is False
    stats = cache.stats()
    assert stats["rejected"] == 1
    assert stats["entries"] == 1 and stats["evictions"] == 0
    assert cache.get("small") is not None
    assert cache.get("huge") is None


def test_refused_value_drops_the_older_value_for_that_key(clock):
    cache = make(clock, max_bytes=2000)
    cache.set("k", b"old")
    assert cache.set("k", bytes(5000)) is False
    assert cache.get_stale("k") is None
    assert cache.stats()["bytes"] == 0


def test_non_bytes_value_is_a_type_error(clock):
    with pytest.raises(TypeError):
        make(clock).set("k", "text")


def test_max_age_rejects_older_entries_as_misses(clock):
    cache = make(clock, ttl=100)
    cache.set("k", b"v")
    clock.advance(30)
    assert cache.get("k", max_age=10) is None
    assert cache.get("k", max_age=30).value == b"v"
    assert cache.get("k").value == b"v"
    stats = cache.stats()
    assert (stats["hits"], stats["misses"]) == (2, 1)


def test_stale_entry_is_served_only_by_get_stale_within_the_window(clock):
    cache = make(clock, ttl=10, stale_ttl=5)
    cache.set("k", b"v")
    clock.advance(10)
    assert cache.get("k") is None
    assert cache.get_stale("k").value == b"v"
    clock.advance(4.999)
    assert cache.get("k") is None
    assert cache.get_stale("k").value == b"v"
    clock.advance(0.001)
    assert cache.get_stale("k") is None
    stats = cache.stats()
    assert (stats["hits"], stats["misses"], stats["stale_hits"]) == (0, 2, 2)
    assert stats["expirations"] == 1 and stats["entries"] == 0


def test_get_stale_also_returns_fresh_entries_without_counting_a_hit(clock):
    cache = make(clock, stale_ttl=5)
    cache.set("k", b"v")
    assert cache.get_stale("k").value == b"v"
    assert cache.stats()["hits"] == 0


def test_stale_entries_count_against_the_byte_budget(clock):
    budget = 3 * entry_size("a", bytes(100))
    cache = make(clock, ttl=10, stale_ttl=60, max_bytes=budget)
    for key in "abc":
        cache.set(key, bytes(100))
    clock.advance(20)  # all three stale now
    cache.set("d", bytes(100))
    stats = cache.stats()
    assert stats["bytes"] == budget
    assert stats["evictions"] == 1
    assert cache.get_stale("a") is None
    assert cache.get_stale("b") is not None


def test_get_on_a_stale_entry_does_not_refresh_its_recency(clock):
    cache = make(clock, maxsize=2, ttl=10, stale_ttl=60)
    cache.set("a", b"x")
    clock.advance(5)
    cache.set("b", b"x")
    clock.advance(6)  # a stale, b fresh
    assert cache.get("a") is None
    cache.set("c", b"x")
    assert cache.get_stale("a") is None
    assert cache.get("b") is not None


def test_expire_drops_expired_entries_and_returns_the_count(clock):
    cache = make(clock, ttl=10)
    for i in range(5):
        cache.set(f"old{i}", b"x")
    clock.advance(5)
    for i in range(3):
        cache.set(f"new{i}", b"x")
    clock.advance(5)
    assert cache.expire() == 5
    assert cache.expire() == 0
    stats = cache.stats()
    assert (stats["entries"], stats["expirations"]) == (3, 5)
    assert stats["bytes"] == 3 * entry_size("new0", b"x")


def test_shrink_evicts_least_recently_used_down_to_the_fraction(clock):
    size = entry_size("k0", bytes(100))
    cache = make(clock, max_bytes=10 * size)
    for i in range(10):
        cache.set(f"k{i}", bytes(100))
    cache.get("k0")
    assert cache.shrink(0.5) == 5
    assert cache.stats()["bytes"] <= 5 * size
    assert [i for i in range(10) if cache.get_stale(f"k{i}")] == [0, 6, 7, 8, 9]
    assert cache.stats()["evictions"] == 5
    assert cache.shrink(0.0) == 5
    assert len(cache) == 0


def test_delete_and_clear(clock):
    cache = make(clock)
    cache.set("a", b"1")
    cache.set("b", b"2")
    assert cache.delete("a") is True
    assert cache.delete("a") is False
    cache.clear()
    stats = cache.stats()
    assert (stats["entries"], stats["bytes"], stats["evictions"]) == (0, 0, 0)


def test_stats_add_up(clock):
    cache = make(clock, maxsize=5)
    rng = random.Random(1)
    lookups = 0
    for _ in range(1000):
        key = f"k{rng.randrange(10)}"
        if rng.random() < 0.5:
            cache.get(key)
            lookups += 1
        else:
            cache.set(key, b"x" * rng.randrange(50))
        clock.advance(rng.random())
    stats = cache.stats()
    assert stats["hits"] + stats["misses"] == lookups
    assert stats["hit_rate"] == pytest.approx(stats["hits"] / lookups)
    assert stats["memory_mb"] == round(stats["bytes"] / 2**20, 3)
    assert set(stats) >= {"hits", "misses", "hit_rate", "entries", "bytes", "memory_mb",
                          "evictions", "expirations", "rejected", "max_entries", "max_bytes"}


def test_hit_rate_is_zero_without_lookups(clock):
    assert make(clock).stats()["hit_rate"] == 0.0


def test_many_threads_hammering_one_cache_keep_it_consistent(clock):
    keys = [f"k{i}" for i in range(300)]
    cache = make(clock, maxsize=100, ttl=1, max_bytes=60 * entry_size("k100", bytes(300)),
                 stale_ttl=0.5)
    lookups = [0] * 8
    errors = []

    def worker(n):
        rng = random.Random(n)
        try:
            for _ in range(5000):
                key = rng.choice(keys)
                op = rng.random()
                if op < 0.45:
                    cache.get(key, max_age=rng.choice((None, 500)))
                    lookups[n] += 1
                elif op < 0.85:
                    cache.set(key, bytes(rng.randrange(600)))
                elif op < 0.93:
                    cache.delete(key)
                elif op < 0.97:
                    len(cache)
                else:
                    clock.advance(0.5)
                    cache.expire()
                    cache.stats()
                    cache.get_stale(key)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    stats = cache.stats()
    assert stats["hits"] + stats["misses"] == sum(lookups)
    held = [e for e in map(cache.get_stale, keys) if e is not None]
    assert stats["entries"] == len(held) <= 100
    assert stats["bytes"] == sum(e.size for e in held) <= stats["max_bytes"]
    assert stats["expirations"] > 0 and stats["evictions"] > 0 and stats["hits"] > 0


def test_request_key_ignores_stream_user_stream_options_and_key_order():
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}
    noisy = {"stream": True, "stream_options": {"include_usage": True}, "user": "u1",
             "temperature": 0, "messages": [{"content": "hi", "role": "user"}], "model": "m"}
    key = request_key("/v1/chat/completions", body)
    assert key == request_key("/v1/chat/completions", noisy)
    assert len(key) == 64 and int(key, 16) >= 0


def test_request_key_differs_by_endpoint_and_by_content():
    body = {"model": "m", "prompt": "hi"}
    key = request_key("/v1/completions", body)
    assert key != request_key("/v1/chat/completions", body)
    assert key != request_key("/v1/completions", {**body, "prompt": "ho"})
    assert key != request_key("/v1/completions", body, ignore=("prompt",))


def test_build_caches_splits_the_budget_80_20_with_the_default_sizes(clock):
    caches = build_caches(clock=clock)
    response, summary = caches.get("response").stats(), caches.get("summary").stats()
    assert response["max_bytes"] + summary["max_bytes"] == 512 * 2**20
    assert response["max_bytes"] == int(512 * 2**20 * 0.8)
    assert (response["max_entries"], summary["max_entries"]) == (10000, 2000)
    assert (caches.response.ttl, caches.summary.ttl) == (1800, 3600)


def test_cache_set_stats_clear_and_expire(clock):
    caches = CacheSet(make(clock, ttl=10), make(clock, ttl=100))
    caches.response.set("a", b"1")
    caches.summary.set("b", b"2")
    assert set(caches.stats()) == {"response_cache", "summary_cache"}
    clock.advance(10)
    assert caches.expire() == 1
    caches.clear("summary")
    assert caches.stats()["summary_cache"]["entries"] == 0
    caches.response.set("a", b"1")
    caches.clear()
    assert caches.stats()["response_cache"]["entries"] == 0
    with pytest.raises(KeyError):
        caches.get("nope")


def _wait_for(condition, timeout=5.0):
    """Poll a condition another thread will make true (the threads, not time, are awaited)."""
    gate = threading.Event()
    for _ in range(int(timeout / 0.001)):
        if condition():
            return
        gate.wait(0.001)
    raise AssertionError(f"condition never became true: {condition}")


def _run_together(n, target):
    results, errors = [None] * n, [None] * n

    def call(i):
        try:
            results[i] = target(i)
        except Exception as exc:
            errors[i] = exc

    threads = [threading.Thread(target=call, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    return threads, results, errors


def test_coalescer_computes_once_for_twenty_concurrent_identical_calls():
    coalescer = Coalescer()
    release = threading.Event()
    calls = []

    def compute():
        calls.append(1)
        release.wait(5)
        return b"answer"

    threads, results, errors = _run_together(20, lambda i: coalescer.run("k", compute, 5))
    _wait_for(lambda: coalescer.stats()["waiting"] == 19)
    release.set()
    for thread in threads:
        thread.join()
    assert errors == [None] * 20
    assert len(calls) == 1
    assert [value for value, _ in results] == [b"answer"] * 20
    assert sorted(shared for _, shared in results) == [False] + [True] * 19
    assert coalescer.in_flight() == 0


def test_coalescer_leader_failure_goes_to_the_leader_and_a_waiter_leads_the_retry():
    coalescer = Coalescer()
    leader_started, release = threading.Event(), threading.Event()
    calls = []

    def failing():
        calls.append("fail")
        leader_started.set()
        release.wait(5)
        raise RuntimeError("upstream down")

    def succeeding():
        calls.append("ok")
        # The other four loop back after the failure and wait on this new leader.
        _wait_for(lambda: coalescer.stats()["waiting"] == 4)
        return b"retry"

    leader, _, leader_errors = _run_together(1, lambda i: coalescer.run("k", failing, 5))
    assert leader_started.wait(5)
    waiters, results, errors = _run_together(5, lambda i: coalescer.run("k", succeeding, 5))
    _wait_for(lambda: coalescer.stats()["waiting"] == 5)
    release.set()
    for thread in leader + waiters:
        thread.join()
    assert isinstance(leader_errors[0], RuntimeError)
    assert errors == [None] * 5
    assert calls == ["fail", "ok"]
    assert [value for value, _ in results] == [b"retry"] * 5
    assert sorted(shared for _, shared in results) == [False] + [True] * 4
    assert coalescer.stats()["leader_failures"] == 1
    assert coalescer.in_flight() == 0


def test_coalescer_waiter_computes_itself_after_the_timeout():
    coalescer = Coalescer()
    leader_started, release = threading.Event(), threading.Event()

    def slow():
        leader_started.set()
        release.wait(5)
        return b"slow"

    leader, leader_results, _ = _run_together(1, lambda i: coalescer.run("k", slow, 5))
    assert leader_started.wait(5)
    assert coalescer.run("k", lambda: b"own", timeout=0.05) == (b"own", False)
    assert coalescer.stats()["timeouts"] == 1
    release.set()
    leader[0].join()
    assert leader_results[0] == (b"slow", False)
    assert coalescer.in_flight() == 0


def test_coalescer_different_keys_do_not_wait_on_each_other():
    coalescer = Coalescer()
    leader_started, release = threading.Event(), threading.Event()

    def blocked():
        leader_started.set()
        release.wait(5)
        return b"a"

    leader, _, _ = _run_together(1, lambda i: coalescer.run("a", blocked, 5))
    assert leader_started.wait(5)
    assert coalescer.run("b", lambda: b"b", timeout=5) == (b"b", False)
    assert coalescer.stats()["timeouts"] == 0
    release.set()
    leader[0].join()
    assert coalescer.in_flight() == 0


def test_coalescer_sequential_calls_each_compute():
    coalescer = Coalescer()
    assert coalescer.run("k", lambda: 1, 1) == (1, False)
    assert coalescer.run("k", lambda: 2, 1) == (2, False)
    with pytest.raises(ValueError):
        coalescer.run("k", lambda: int("x"), 1)
    assert coalescer.in_flight() == 0
