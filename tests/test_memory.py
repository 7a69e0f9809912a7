"""MemoryManager: pressure levels and their cleanups, periodic expiry, leak detection, GC
tuning, tracemalloc and the monitor thread; on injected readers and a fake clock."""

from __future__ import annotations

import dataclasses
import gc
import logging
import threading
import tracemalloc
from types import SimpleNamespace

import pytest

from app.cache import build_caches
from app.runtime import leaks
from app.runtime.memory import MB, MemoryManager, count_objects
from settings import MemorySettings
from tests.conftest import FakeClock


class FakeRSS:
    """This process's RSS as the test says, in MB."""

    def __init__(self, mb=100.0):
        self.mb = mb
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return int(self.mb * MB)


class RecordingGC:
    """The real gc module with collect() calls recorded; run only when `real` (a full
    collection in a process that has run the whole suite takes half a second)."""

    def __init__(self, real=False):
        self.collects = []
        self.real = real

    def collect(self, generation=2):
        self.collects.append(generation)
        return gc.collect(generation) if self.real else 0

    def __getattr__(self, name):
        return getattr(gc, name)


def system(total_mb=8192, available_mb=6144):
    return lambda: SimpleNamespace(total=int(total_mb * MB), available=int(available_mb * MB))


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def caches(clock):
    """Real caches on the fake clock: response 0.8 MB / ttl 10 s, summary 0.2 MB / ttl 100 s."""
    return build_caches(max_memory_mb=1, response_size=100, response_ttl=10, summary_size=100,
                        summary_ttl=100, clock=clock)


def manager(caches=None, clock=None, rss=None, **options):
    options.setdefault("system_reader", system())
    options.setdefault("object_counter", lambda: {"dict": 1000})
    fields = {f.name for f in dataclasses.fields(MemorySettings)}
    section = {"enable_gc_tuning": True, **{k: v for k, v in options.items() if k in fields}}
    others = {k: v for k, v in options.items() if k not in fields}
    settings = MemorySettings(memory_threshold_mb=1024, emergency_threshold_mb=1536, **section)
    return MemoryManager(caches, settings, rss_reader=rss or FakeRSS(),
                         clock=clock or FakeClock(), **others)


def fill(cache, n, size=30_000, prefix="k"):
    for i in range(n):
        assert cache.set(f"{prefix}{i}", b"x" * size)


# -- pressure levels ----------------------------------------------------------------------

def test_below_the_threshold_is_normal_and_cleans_nothing(caches, clock):
    fill(caches.response, 5)
    fake_gc = RecordingGC()
    mm = manager(caches, clock, FakeRSS(1023.9), gc_module=fake_gc)
    result = mm.check()
    assert result["pressure"] == "normal"
    assert result["cleanup"] is None and result["periodic"] is None
    assert len(caches.response) == 5
    assert fake_gc.collects == []
    assert mm.stats()["checks"] == 1


def test_high_pressure_expires_caches_and_collects_young_generations(caches, clock):
    fill(caches.response, 4, prefix="old")
    fill(caches.summary, 2)
    clock.advance(5)
    fill(caches.response, 3, prefix="new")
    clock.advance(6)  # the old ones are past the response ttl; the rest are fresh
    fake_gc = RecordingGC()
    mm = manager(caches, clock, FakeRSS(1024), gc_module=fake_gc)
    result = mm.check()
    assert result["pressure"] == "high"
    cleanup = result["cleanup"]
    assert cleanup["level"] == "normal"
    assert cleanup["expired"] == 4
    assert cleanup["before"]["entries"] == cleanup["after"]["entries"] == 5  # after expiry
    assert (len(caches.response), len(caches.summary)) == (3, 2)
    assert fake_gc.collects == [1]


def test_critical_pressure_shrinks_response_cache_to_half_and_clears_summary(caches, clock):
    fill(caches.response, 25)  # ~750 KB of a 0.8 MB budget
    fill(caches.summary, 5)
    budget = caches.response.max_bytes
    assert caches.response.stats()["bytes"] > 0.5 * budget
    fake_gc = RecordingGC()
    mm = manager(caches, clock, FakeRSS(1536), gc_module=fake_gc)
    result = mm.check()
    assert result["pressure"] == "critical"
    cleanup = result["cleanup"]
    assert cleanup["level"] == "emergency"
    assert caches.response.stats()["bytes"] <= 0.5 * budget
    assert len(caches.response) == 25 - cleanup["evicted"] > 0
    assert cleanup["cleared"] == 5 and len(caches.summary) == 0
    assert cleanup["after"]["bytes"] < cleanup["before"]["bytes"]
    assert fake_gc.collects == [2]


def test_pressure_cleanup_waits_for_the_cooldown_but_escalation_does_not(caches, clock):
    rss = FakeRSS(1100)
    fake_gc = RecordingGC()
    mm = manager(caches, clock, rss, pressure_cooldown=60, gc_module=fake_gc)
    assert mm.check()["cleanup"]["level"] == "normal"
    clock.advance(10)
    assert mm.check()["cleanup"] is None             # high again, within the cooldown
    rss.mb = 1600
    clock.advance(10)
    assert mm.check()["cleanup"]["level"] == "emergency"  # escalated: at once
    rss.mb = 1100
    clock.advance(10)
    assert mm.check()["cleanup"] is None             # an emergency cleanup covers high too
    clock.advance(60)
    assert mm.check()["cleanup"]["level"] == "normal"
    assert mm.stats()["cleanups"] == {"normal": 2, "emergency": 1}


def test_pressure_changes_are_logged_once_per_change(caches, clock, caplog):
    rss = FakeRSS(1100)
    mm = manager(caches, clock, rss)
    with caplog.at_level(logging.INFO, logger="llm_proxy.memory"):
        mm.check()
        mm.check()
        rss.mb = 100
        mm.check()
    changes = [r.getMessage() for r in caplog.records if "memory pressure" in r.getMessage()]
    assert len(changes) == 2
    assert "normal -> high" in changes[0] and "high -> normal" in changes[1]


# -- periodic cleanup ---------------------------------------------------------------------

def test_periodic_cleanup_expires_caches_every_interval_at_normal_pressure(caches, clock):
    fake_gc = RecordingGC()
    mm = manager(caches, clock, FakeRSS(100), cleanup_interval=300, gc_module=fake_gc)
    fill(caches.response, 3)
    clock.advance(299)
    assert mm.check()["periodic"] is None
    clock.advance(1)
    periodic = mm.check()["periodic"]
    assert periodic["expired"] == 3
    assert len(caches.response) == 0
    fill(caches.response, 2)
    clock.advance(299)
    assert mm.check()["periodic"] is None            # the next one is 300 s after the last
    clock.advance(1)
    assert mm.check()["periodic"]["expired"] == 2
    assert fake_gc.collects == []                     # periodic expiry does not collect
    assert mm.stats()["periodic"]["runs"] == 2


def test_every_check_trims_the_heap_once_with_or_without_a_cleanup(caches, clock):
    trims = []
    rss = FakeRSS(100)
    mm = manager(caches, clock, rss, heap_trim=lambda: trims.append(clock()))
    mm.check()
    clock.advance(10)
    mm.check()
    assert len(trims) == 2                            # normal pressure: every sample
    rss.mb = 1100
    clock.advance(10)
    assert mm.check()["cleanup"] is not None          # high pressure: a cleanup
    assert len(trims) == 3                            # the cleanup's own trim, not a second one


def test_periodic_cleanup_takes_leak_snapshots(clock):
    counts = {"Session": 10}

    def counter():
        counts["Session"] += 100
        return dict(counts)

    mm = manager(None, clock, FakeRSS(100), cleanup_interval=300, leak_snapshots=3,
                 object_counter=counter)
    flags = []
    for _ in range(4):
        clock.advance(300)
        flags.append(mm.check()["periodic"]["leak_suspected"])
    assert flags == [False, False, False, True]
    assert mm.stats()["leak"]["growing_types"][0]["type"] == "Session"


def test_leak_detection_disabled_takes_no_periodic_snapshot(clock):
    calls = []
    mm = manager(None, clock, leak_detection_enabled=False,
                 object_counter=lambda: calls.append(1) or {})
    clock.advance(300)
    assert mm.check()["periodic"] == {"expired": 0, "leak_suspected": False}
    assert calls == [] and mm.stats()["leak"]["enabled"] is False


# -- cleanup() ----------------------------------------------------------------------------

def test_cleanup_reports_before_and_after_figures(caches, clock):
    fill(caches.response, 10)
    fill(caches.summary, 3, size=1000)
    clock.advance(11)  # the response entries have expired
    rss = iter([500 * MB, 480 * MB])
    mm = manager(caches, clock, rss=lambda: next(rss), wall_clock=lambda: 1_700_000_000.0)
    result = mm.cleanup()
    assert result["level"] == "normal" and result["at"] == 1_700_000_000.0
    assert result["before"]["rss_mb"] == 500 and result["after"]["rss_mb"] == 480
    assert result["freed_mb"] == 20
    assert result["before"]["entries"] == result["after"]["entries"] == 3  # after expiry
    assert result["before"]["bytes"] == result["after"]["bytes"] > 0
    assert result["expired"] == 10 and result["evicted"] == result["cleared"] == 0
    assert result["gc_collected"] >= 0 and result["seconds"] >= 0
    clock.advance(5)
    last = mm.stats()["last_cleanup"]
    assert last["before"] == result["before"] and last["age_s"] == 5


def test_emergency_cleanup_without_caches_still_collects(clock):
    fake_gc = RecordingGC(real=True)
    mm = manager(None, clock, gc_module=fake_gc)
    garbage = []
    garbage.append(garbage)  # a reference cycle only a collection frees
    del garbage
    result = mm.cleanup("emergency")
    assert result["before"]["entries"] == result["after"]["entries"] == 0
    assert result["gc_collected"] >= 1
    assert fake_gc.collects == [2]


def test_cleanup_rejects_an_unknown_level():
    with pytest.raises(ValueError):
        manager().cleanup("gentle")


# -- leak detection -----------------------------------------------------------------------

class LeakyThing:
    pass


class SteadyThing:
    pass


def test_a_growing_list_is_reported_as_a_leak_by_the_default_counter(clock):
    """A real list that gains 500 objects between snapshots, seen through gc.get_objects()."""
    mm = manager(None, clock, FakeRSS(200), leak_snapshots=4, object_counter=None)
    leak = []
    for _ in range(5):
        leak.extend(LeakyThing() for _ in range(500))
        clock.advance(300)
        report = mm.snapshot()
    assert report["suspected"]
    mine = [t for t in report["growing_types"] if t["type"].endswith("LeakyThing")]
    assert mine == [{"type": f"{__name__}.LeakyThing", "count": 2500, "growth": 2000}]
    assert report["rss_growing"] is False and report["rss_trend_mb_per_min"] == 0


def test_a_steady_real_workload_is_not_reported(clock):
    """Objects made and dropped each round, at a steady level, are not growth."""
    mm = manager(None, clock, FakeRSS(200), leak_snapshots=4, object_counter=None)
    for _ in range(6):
        held = [SteadyThing() for _ in range(500)]
        clock.advance(300)
        report = mm.snapshot()
        del held
    assert not [t for t in report["growing_types"] if t["type"].endswith("SteadyThing")]


def test_steady_counts_with_noise_and_flat_rss_are_quiet(clock):
    rss = FakeRSS(300)
    noise = iter([0, 40, -30, 25, -10, 35, 0])
    mm = manager(None, clock, rss, leak_snapshots=3,
                 object_counter=lambda: {"dict": 20_000 + next(noise) * 10, "Entry": 5000})
    for step in range(7):
        rss.mb = 300 + (0.4 if step % 2 else 0)  # sub-tolerance wobble
        clock.advance(300)
        report = mm.snapshot()
    assert report == {"suspected": False, "rss_growing": False, "growing_types": [],
                      "rss_trend_mb_per_min": report["rss_trend_mb_per_min"], "snapshots": 4}
    assert abs(report["rss_trend_mb_per_min"]) < 0.05


def test_rss_growing_every_snapshot_is_a_leak_with_its_trend(clock):
    rss = FakeRSS(300)
    mm = manager(None, clock, rss, leak_snapshots=3, object_counter=lambda: {"dict": 100})
    for _ in range(4):
        clock.advance(60)
        rss.mb += 6
        report = mm.snapshot()
    assert report["suspected"] and report["rss_growing"]
    assert report["growing_types"] == []
    assert report["rss_trend_mb_per_min"] == pytest.approx(6.0)
    assert mm.stats()["leak"]["suspected"] is True


def test_one_flat_step_in_the_window_means_no_leak(clock):
    series = iter([100, 200, 300, 300, 400, 500])
    mm = manager(None, clock, FakeRSS(300), leak_snapshots=3,
                 object_counter=lambda: {"Thing": next(series)})
    reports = []
    for _ in range(6):
        clock.advance(300)
        reports.append(mm.snapshot()["suspected"])
    # Windows of 4: [100..300,300], [200,300,300,400], [300,300,400,500]: each has a flat step.
    assert reports == [False] * 6


def test_growth_within_the_relative_tolerance_is_not_a_leak(clock):
    series = iter([100_000, 100_500, 101_000, 101_500])  # +0.5% per snapshot, under 1%
    mm = manager(None, clock, leak_snapshots=3, object_counter=lambda: {"dict": next(series)})
    for _ in range(4):
        report = mm.snapshot()
    assert not report["suspected"]


def test_suspected_leak_is_logged_once(clock, caplog):
    n = iter(range(0, 10_000, 100))
    mm = manager(None, clock, leak_snapshots=2, object_counter=lambda: {"Thing": next(n)})
    with caplog.at_level(logging.WARNING, logger="llm_proxy.memory"):
        for _ in range(5):
            mm.snapshot()
    assert [r.getMessage() for r in caplog.records].count(
        "memory leak suspected: RSS trend 0.00 MB/min, growing types Thing +200") == 1


def test_count_objects_sees_instances_of_a_class():
    things = [LeakyThing() for _ in range(123)]
    assert count_objects()[f"{__name__}.LeakyThing"] >= 123
    assert count_objects()["dict"] > 0
    del things


# -- GC tuning ----------------------------------------------------------------------------

def test_tune_gc_sets_thresholds_and_freezes_and_untune_restores():
    before = gc.get_threshold()
    mm = manager(gc_thresholds=(40000, 15, 15))
    try:
        assert mm.tune_gc() is True
        assert gc.get_threshold() == (40000, 15, 15)
        assert gc.get_freeze_count() > 0
        assert mm.tune_gc() is False                  # once only
        stats = mm.stats()["gc"]
        assert stats["tuned"] and stats["thresholds"] == [40000, 15, 15]
        assert stats["frozen"] > 0 and len(stats["collections"]) == 3
        assert mm.untune_gc() is True
        assert gc.get_threshold() == before
        assert gc.get_freeze_count() == 0
        assert mm.untune_gc() is False
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()


def test_tune_gc_does_nothing_when_disabled():
    before = gc.get_threshold()
    mm = manager(enable_gc_tuning=False, gc_thresholds=(40000, 15, 15))
    try:
        assert mm.tune_gc() is False
        assert gc.get_threshold() == before and gc.get_freeze_count() == 0
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()


def test_gc_collections_are_counted_in_stats():
    mm = manager()
    first = mm.stats()["gc"]["collections"]
    gc.collect()
    assert mm.stats()["gc"]["collections"][2] == first[2] + 1


# -- the thread ---------------------------------------------------------------------------

def test_start_twice_runs_one_thread_and_stop_joins_it():
    rss = FakeRSS(100)
    ticked = threading.Event()
    mm = manager(rss=lambda: ticked.set() or rss(), sample_interval=0.01)
    try:
        assert mm.start() is True
        assert mm.start() is False
        threads = [t for t in threading.enumerate() if t.name == "llm-proxy-memory"]
        assert len(threads) == 1
        thread = threads[0]
        assert thread.daemon and mm.running
        assert ticked.wait(2.0)
    finally:
        assert mm.stop(timeout=2.0) is True
    assert not thread.is_alive() and not mm.running
    assert mm.stats()["checks"] >= 1


def test_a_failing_reader_is_logged_and_the_thread_keeps_running(caplog):
    calls = []
    recovered = threading.Event()

    def reader():
        calls.append(1)
        if len(calls) == 1:
            raise OSError("no /proc")
        if len(calls) >= 3:
            recovered.set()
        return 100 * MB

    mm = manager(rss=reader, sample_interval=0.01)
    with caplog.at_level(logging.ERROR, logger="llm_proxy.memory"):
        mm.start()
        try:
            assert recovered.wait(2.0)
        finally:
            mm.stop(timeout=2.0)
    assert any(r.name == "llm_proxy.memory" and r.exc_info for r in caplog.records)
    stats = mm.stats()
    assert stats["errors"] == 1 and stats["last_error"] == "OSError: no /proc"
    assert stats["checks"] >= 1


def test_check_returns_the_error_instead_of_raising(caplog):
    def broken():
        raise RuntimeError("boom")

    mm = manager(rss=broken)
    with caplog.at_level(logging.ERROR, logger="llm_proxy.memory"):
        assert mm.check() == {"error": "RuntimeError: boom"}
    assert "memory check failed" in caplog.text


def test_stop_without_start_is_a_no_op():
    assert manager().stop() is True


# -- tracemalloc --------------------------------------------------------------------------

def test_tracemalloc_runs_only_between_start_and_stop():
    if tracemalloc.is_tracing():
        pytest.skip("tracemalloc already on for this run")
    mm = manager()
    assert leaks.tracemalloc_top() == [] and mm.stats()["tracemalloc"] == {"tracing": False}
    try:
        assert leaks.start_tracemalloc(frames=1) is True
        assert leaks.start_tracemalloc() is False
        hoard = [bytearray(1000) for _ in range(2000)]  # ~2 MB on one line
        top = leaks.tracemalloc_top(n=3)
        assert len(top) <= 3
        assert top[0]["file"] == __file__ and top[0]["size_kb"] >= 1900
        assert top[0]["count"] >= 2000 and len(top[0]["traceback"]) == 1
        assert mm.stats()["tracemalloc"]["traced_mb"] >= 1.9
        del hoard
    finally:
        assert leaks.stop_tracemalloc() is True
    assert not tracemalloc.is_tracing() and leaks.stop_tracemalloc() is False


# -- stats --------------------------------------------------------------------------------

def test_stats_report_process_rss_and_system_memory(clock):
    mm = manager(None, clock, FakeRSS(368.5), system_reader=system(814.3, 445.8))
    stats = mm.stats()
    assert stats["rss_mb"] == stats["used_mb"] == 368.5
    assert stats["available_mb"] == pytest.approx(445.8, abs=0.001)
    assert stats["total_mb"] == pytest.approx(814.3, abs=0.001)
    assert stats["usage_percent"] == 45.3  # (total - available) / total of the machine
    assert stats["pressure"] == "normal"
    assert (stats["threshold_mb"], stats["emergency_threshold_mb"]) == (1024, 1536)
    assert stats["leak"] == {"suspected": False, "rss_growing": False, "growing_types": [],
                             "rss_trend_mb_per_min": 0.0, "snapshots": 0, "enabled": True}
    assert stats["last_cleanup"] is None and stats["checks"] == 0
    assert stats["running"] is False


def test_stats_survive_failing_readers(clock, caplog):
    broken = []

    def reader(value):
        def read():
            if broken:
                raise OSError("gone")
            return value
        return read

    mm = manager(None, clock, reader(1200 * MB), system_reader=reader(system()()))
    mm.check()
    broken.append(True)
    with caplog.at_level(logging.ERROR, logger="llm_proxy.memory"):
        stats = mm.stats()
    assert stats["rss_mb"] == 1200 and stats["pressure"] == "high"  # the last sample
    assert stats["usage_percent"] is None and stats["available_mb"] is None
    assert "reading RSS failed" in caplog.text


def test_default_readers_read_this_process():
    mm = MemoryManager()
    stats = mm.stats()
    assert 1 < stats["rss_mb"] < stats["total_mb"]
    assert 0 < stats["usage_percent"] < 100


def test_checks_cleanups_and_stats_run_concurrently(caches, clock):
    rss = FakeRSS(1600)
    fake_gc = RecordingGC()
    mm = manager(caches, clock, rss, pressure_cooldown=0, gc_module=fake_gc)
    errors = []

    def work(fn):
        try:
            for i in range(50):
                fill(caches.response, 2, size=1000, prefix=f"{threading.get_ident()}-{i}-")
                fn()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(fn,))
               for fn in (mm.check, mm.stats, lambda: mm.cleanup("emergency"), mm.snapshot)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert errors == []
    assert mm.stats()["errors"] == 0 and mm.stats()["checks"] == 50


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        MemoryManager(None, MemorySettings(memory_threshold_mb=2000, emergency_threshold_mb=1000),
                      rss_reader=FakeRSS(), system_reader=system())
    with pytest.raises(ValueError):
        MemoryManager(None, MemorySettings(leak_snapshots=0), rss_reader=FakeRSS(),
                      system_reader=system())


def test_the_thread_can_be_started_again_after_a_stop():
    ticks = threading.Semaphore(0)
    rss = FakeRSS(100)
    mm = manager(rss=lambda: ticks.release() or rss(), sample_interval=0.01)
    try:
        for _ in range(2):
            assert mm.start() is True
            assert ticks.acquire(timeout=2.0)
            assert mm.stop(timeout=2.0) is True and not mm.running
    finally:
        mm.stop(timeout=2.0)
