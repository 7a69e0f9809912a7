"""The console's timeline: per-second counters of the last hour in a ring buffer, percentiles
from fixed log buckets that add up across processes, and the exchange of every process's
seconds through Redis."""

from __future__ import annotations

import math
import struct
from types import SimpleNamespace

import pytest
import redis

from app.observability.timeline import (BUCKETS, SLOTS, NullTimeline, Series,
                                        Timeline, bucket_of, bucket_value, percentile)
from app.observability.timeline_exchange import Exchange
from tests.conftest import FakeClock

START = 1_900_000_020.0  # 2030-03-17, on a whole minute: points line up with it


def trace(cache="", tokens=0):
    """What _finished hands the timeline: the request's Trace (its cache verdict, tokens)."""
    return SimpleNamespace(cache=cache, tokens=lambda: tokens)


def timeline(clock=None) -> tuple[Timeline, FakeClock]:
    clock = clock or FakeClock(START)
    return Timeline(wall=clock), clock


def test_a_request_counts_in_the_second_it_ended_with_its_errors_cache_tokens_and_cost():
    t, clock = timeline()
    t.record(200, 0.120, 0.4, trace("MISS", tokens=30), 0.002)
    t.record(200, 0.001, 0.2, trace("HIT"), 0.0)
    t.record(502, 2.5, 1.0, trace("BYPASS"), 0.0)
    t.record(429, 0.0005, 0.1, trace(), 0.0)
    clock.advance(1)
    hour = t.series(30).totals()
    assert (hour.requests, hour.errors, hour.refused) == (4, 1, 1)
    assert (hour.cache_hits, hour.cache_lookups) == (1, 2)  # a BYPASS is no lookup
    assert hour.tokens == 30 and hour.cost == pytest.approx(0.002)
    assert t.today() == (4, 30, pytest.approx(0.002))


def test_percentiles_come_from_log_buckets_within_about_19_percent_of_the_truth():
    for ms in (0.07, 0.3, 1, 4.2, 17, 120, 999, 12_345, 100_000):
        estimate = bucket_value(bucket_of(ms))
        assert abs(estimate - ms) / ms < 0.19, ms
    t, _ = timeline()
    for ms in range(1, 101):  # 1..100 ms: p50 about 50, p99 about 99
        t.record(200, ms / 1000, None, trace(), 0.0)
    hour = t.series(30).totals()
    assert hour.latency_p50 == pytest.approx(50, rel=0.19)
    assert hour.latency_p99 == pytest.approx(99, rel=0.19)
    assert hour.overhead_p50 is None  # nothing recorded: no figure, not a zero
    assert bucket_of(0) == 0 and bucket_of(10 ** 9) == BUCKETS - 1
    assert percentile([0] * BUCKETS, 0.5) is None


def test_seconds_older_than_the_hour_drop_out_and_an_idle_gap_leaves_no_stale_slot():
    t, clock = timeline()
    t.record(200, 0.01, 0.1, trace(), 0.0)
    clock.advance(1800)
    t.record(200, 0.01, 0.1, trace(), 0.0)
    assert t.series(30).totals().requests == 2
    clock.advance(1801)  # the first is 3601 s old, the second 1801 s
    assert t.series(30).totals().requests == 1
    clock.advance(SLOTS * 3 + 7)  # idle for hours: every slot emptied, none read as new
    t.record(200, 0.01, 0.1, trace(), 0.0)
    assert t.series(30).totals().requests == 1


def test_points_are_aligned_on_their_step_and_the_newest_is_cut_at_now():
    t, clock = timeline(FakeClock(START + 42))  # 12 s into a 30 s point
    t.record(200, 0.01, 0.1, trace(), 0.0)
    series = t.series(30)
    assert series.points == SLOTS // 30 and series.end - series.start == SLOTS
    newest = series.point(series.points - 1)
    assert newest.start == START + 30 and newest.seconds == 13 and newest.requests == 1
    assert series.totals(last_seconds=60).requests == 1
    with pytest.raises(ValueError):
        Series(int(START), 7)  # a step must divide the hour


def test_a_clock_stepped_back_counts_in_its_own_second_or_else_the_newest():
    t, clock = timeline()
    clock.advance(100)
    t.record(200, 0.01, 0.1, trace(), 0.0)
    clock.advance(-50)
    t.record(200, 0.01, 0.1, trace(), 0.0)
    clock.advance(-2 * SLOTS)
    t.record(200, 0.01, 0.1, trace(), 0.0)
    clock.advance(2 * SLOTS)
    assert t.series(30, now=START + 100).totals().requests == 3


def test_seconds_packed_by_one_process_add_up_bucket_by_bucket_in_anothers_series():
    a, clock = timeline()
    b = Timeline(wall=clock)
    for ms in (5, 50, 500):
        a.record(200, ms / 1000, 0.2, trace("MISS", 10), 0.01)
    clock.advance(61)
    b.record(503, 2.0, 1.5, trace("HIT"), 0.0)
    last, rows = a.rows(int(START) - 10)
    assert last == int(START) + 61 and [second for second, _ in rows] == [int(START)]
    merged = b.series(30)
    for second, row in rows:
        merged.add_row(second, row)
    hour = merged.totals()
    assert (hour.requests, hour.errors, hour.tokens, hour.cache_hits) == (4, 1, 30, 1)
    assert hour.cost == pytest.approx(0.03)
    assert hour.latency_p99 == pytest.approx(2000, rel=0.19)
    assert merged.point(merged.points - 3).requests == 3  # a's second, two points back


ROW = struct.Struct("<6Qd2B")


@pytest.mark.parametrize("row", [
    b"", b"\x00" * 7, b"\x01" * 200,
    ROW.pack(1, 0, 0, 0, 0, 0, 0.0, 1, 0),  # says one bucket follows; none does
    ROW.pack(1, 0, 0, 0, 0, 0, float("nan"), 0, 0),
], ids=["empty", "short", "ragged", "missing-buckets", "nan-cost"])
def test_a_malformed_published_row_is_ignored(row):
    series = Series(int(START), 30)
    series.add_row(int(START), row)
    assert series.totals().requests == 0
    assert all(math.isfinite(p.cost) for p in series.all_points())
    series.add_row(int(START) - 10 * SLOTS, ROW.pack(1, 0, 0, 0, 0, 0, 0.0, 0, 0))
    assert series.totals().requests == 0  # a second outside the hour


def test_recording_is_a_few_microseconds_and_the_ring_a_fixed_size():
    import time as real_time
    t, _ = timeline()
    sample = trace("MISS", 12)
    started = real_time.perf_counter()
    for _ in range(20_000):
        t.record(200, 0.05, 0.3, sample, 0.0001)
    per_call = (real_time.perf_counter() - started) / 20_000
    assert per_call < 50e-6, per_call  # about 2 us here; generous for a loaded CI machine
    size = sum(a.itemsize * len(a) for a in (t._counts, t._cost, t._latency, t._overhead))
    assert size < 2 * 1024 * 1024


def test_the_null_timeline_records_nothing_and_costs_nothing():
    null = NullTimeline()
    assert null.record(200, 0.1, 0.1, trace(), 0.0) is None and not null.enabled
    null.close()


# -- through Redis --------------------------------------------------------------------------

def exchange(redis_url, prefix, clock) -> tuple[Exchange, Timeline]:
    ex = Exchange(redis_url, prefix, wall=clock)
    t = Timeline(wall=clock, exchange=ex)
    ex.timeline = t  # published by the tests' calls, not a thread
    return ex, t


def test_every_processs_seconds_are_merged_through_redis_and_a_silent_one_ages_out(
        redis_url, prefix):
    clock = FakeClock(START)
    ex_a, a = exchange(redis_url, prefix, clock)
    ex_b, b = exchange(redis_url, prefix, clock)
    ex_c, c = exchange(redis_url, prefix, clock)
    try:
        a.record(200, 0.01, 0.1, trace("MISS", 5), 0.01)
        b.record(502, 0.5, 0.2, trace(), 0.0)
        b.record(200, 0.02, 0.1, trace("HIT"), 0.0)
        assert ex_a.publish() == 1 and ex_b.publish() == 1
        assert ex_c.publish() == 0  # nothing to say: nothing written
        clock.advance(5)
        series = c.series(30)
        assert ex_c.gather(series) == 2 and series.processes == 3
        hour = series.totals()
        assert (hour.requests, hour.errors, hour.cache_hits, hour.tokens) == (3, 1, 1, 5)
        requests, tokens, cost, processes = ex_c.today(clock())
        assert (requests, tokens, processes) == (3, 5, 2) and cost == pytest.approx(0.01)
        # a's own series is not counted twice: gather skips this process's id
        mine = a.series(30)
        ex_a.gather(mine)
        assert mine.totals().requests == 3
        client = redis.Redis.from_url(redis_url)
        ttls = [client.ttl(k) for k in client.scan_iter(match=prefix + "console:timeline:*:*")]
        assert ttls and all(0 < ttl <= SLOTS + 120 for ttl in ttls)
        client.close()
        clock.advance(SLOTS + 10)  # an hour later a and b said nothing more
        late = c.series(30)
        assert ex_c.gather(late) == 0 and late.totals().requests == 0
    finally:
        for ex in (ex_a, ex_b, ex_c):
            ex.client.close()


def test_publishing_sends_the_last_second_again_as_it_may_have_grown(redis_url, prefix):
    clock = FakeClock(START)
    ex_a, a = exchange(redis_url, prefix, clock)
    ex_b, b = exchange(redis_url, prefix, clock)
    try:
        a.record(200, 0.01, 0.1, trace(), 0.0)
        ex_a.publish()
        a.record(200, 0.01, 0.1, trace(), 0.0)  # the same second, after its publication
        clock.advance(2)
        a.record(200, 0.01, 0.1, trace(), 0.0)
        ex_a.publish()
        series = b.series(30)
        ex_b.gather(series)
        assert series.totals().requests == 3
    finally:
        ex_a.client.close()
        ex_b.client.close()


def test_redis_away_raises_for_the_console_to_say_so_and_the_thread_survives(prefix):
    clock = FakeClock(START)
    ex = Exchange("redis://127.0.0.1:1/0", prefix, wall=clock, interval=0.01)
    t = Timeline(wall=clock, exchange=ex)
    ex.start(t)
    try:
        t.record(200, 0.01, 0.1, trace(), 0.0)
        with pytest.raises(redis.RedisError):
            ex.gather(t.series(30))
        assert ex._thread.is_alive()
    finally:
        t.close()
    assert not ex._thread.is_alive()


def test_a_minute_over_is_summed_once_and_later_seconds_still_arrive(redis_url, prefix):
    clock = FakeClock(START)
    ex_a, a = exchange(redis_url, prefix, clock)
    ex_b, b = exchange(redis_url, prefix, clock)
    try:
        for _ in range(3):
            a.record(200, 0.01, 0.1, trace(), 0.0)
        ex_a.publish()
        clock.advance(90)  # START's minute is over and published everywhere
        a.record(500, 0.01, 0.1, trace(), 0.0)
        ex_a.publish()
        for _ in range(3):  # each refresh reads the newest minutes again, the old one once
            series = b.series(30)
            assert ex_b.gather(series) == 1
            hour = series.totals()
            assert (hour.requests, hour.errors) == (4, 1)
        summed = {minute for _, minute, _ in ex_b._minutes}
        assert int(START) // 60 in summed and int(clock()) // 60 not in summed
        clock.advance(1)
        a.record(200, 0.01, 0.1, trace(), 0.0)
        ex_a.publish()
        series = b.series(30)
        ex_b.gather(series)
        assert series.totals().requests == 5
    finally:
        ex_a.client.close()
        ex_b.client.close()
