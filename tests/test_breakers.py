"""Per-provider circuit breakers: states, adaptive thresholds, cool-down, and concurrent use."""

from __future__ import annotations

import logging
import random
import threading
import time

import pybreaker
import pytest

from app.pipeline.breakers import BreakerBoard, ProviderBreaker
from settings import CircuitBreakerSettings

TWO_STRIKES = CircuitBreakerSettings(failure_threshold=2, adaptive_thresholds=False)
from tests.conftest import FakeClock


class Recorder:
    """A listener that keeps every state change it is told about."""

    def __init__(self):
        self.changes = []

    def state_change(self, name, old, new):
        self.changes.append((name, old, new))


@pytest.fixture
def clock():
    return FakeClock()


def make(clock, storage=None, listeners=(), **settings):
    return ProviderBreaker("up", CircuitBreakerSettings(**settings), clock=clock,
                           storage=storage, listeners=listeners)


def fail(breaker, times):
    for _ in range(times):
        assert breaker.allow()
        breaker.record_failure()


def succeed(breaker, times):
    for _ in range(times):
        assert breaker.allow()
        breaker.record_success()


def trip(breaker):
    """Fail calls until the breaker opens (at most failure_threshold of them)."""
    while breaker.state == "closed":
        assert breaker.allow()
        breaker.record_failure()
    assert breaker.state == "open"


# -- closed -> open ------------------------------------------------------------------------

def test_new_breaker_is_closed_and_allows_calls(clock):
    """A new breaker is closed, allows calls and reports an empty, healthy window."""
    breaker = make(clock)
    assert breaker.allow()
    assert breaker.snapshot() == {"state": "closed", "failures": 0, "threshold": 5,
                                  "success_rate": 1.0, "calls_in_window": 0, "retry_in": 0.0}


def test_opens_after_failure_threshold_consecutive_failures(clock):
    """failure_threshold consecutive failures open it; then allow() is false (no call is made)."""
    breaker = make(clock, failure_threshold=5)
    fail(breaker, 4)
    assert breaker.state == "closed"
    assert breaker.snapshot()["failures"] == 4
    fail(breaker, 1)
    assert breaker.state == "open"
    assert not breaker.allow()
    assert breaker.snapshot()["failures"] == 5


def test_a_success_resets_the_consecutive_failures(clock):
    """Failures only count while consecutive: one success starts the count again."""
    breaker = make(clock, adaptive_thresholds=False)
    fail(breaker, 4)
    succeed(breaker, 1)
    assert breaker.snapshot()["failures"] == 0
    fail(breaker, 4)
    assert breaker.state == "closed"


def test_state_lives_in_the_pybreaker_storage(clock):
    """The state is kept in the pybreaker storage passed in, where a shared store can hold it."""
    storage = pybreaker.CircuitMemoryStorage(pybreaker.STATE_CLOSED)
    breaker = make(clock, storage=storage, adaptive_thresholds=False)
    fail(breaker, 5)
    assert storage.state == pybreaker.STATE_OPEN
    assert storage.counter == 5


def test_a_circuit_opened_through_shared_storage_is_honoured(clock):
    """A breaker sharing storage with one that tripped refuses calls for a recovery period."""
    storage = pybreaker.CircuitMemoryStorage(pybreaker.STATE_CLOSED)
    first = make(clock, storage=storage, adaptive_thresholds=False)
    second = make(clock, storage=storage, adaptive_thresholds=False)
    fail(first, 5)
    assert not second.allow()
    assert second.retry_at() == clock.now + 60.0


# -- open -> half-open -> closed / open ----------------------------------------------------

def test_open_moves_to_half_open_when_asked_after_the_recovery_timeout(clock):
    """Open refuses until recovery_timeout has passed; the next allow() moves it to half-open."""
    breaker = make(clock, recovery_timeout=60.0)
    trip(breaker)
    clock.advance(59.9)
    assert not breaker.allow()
    clock.advance(0.1)
    assert breaker.state == "open"          # time alone does not move it
    assert breaker.allow()
    assert breaker.state == "half_open"


def test_half_open_closes_after_success_threshold_successes(clock):
    """success_threshold successful trials close it, with the failures and window cleared."""
    breaker = make(clock, success_threshold=3)
    trip(breaker)
    clock.advance(60)
    succeed(breaker, 2)
    assert breaker.state == "half_open"
    succeed(breaker, 1)
    snap = breaker.snapshot()
    assert snap["state"] == "closed"
    assert snap["failures"] == 0
    assert snap["calls_in_window"] == 0
    assert breaker.allow()


def test_a_failure_in_half_open_reopens_for_a_new_recovery_period(clock):
    """Any failed trial opens it again, and the recovery period starts from that failure."""
    breaker = make(clock, recovery_timeout=60.0)
    trip(breaker)
    clock.advance(60)
    succeed(breaker, 2)
    clock.advance(5)
    fail(breaker, 1)
    assert breaker.state == "open"
    assert breaker.retry_at() == clock.now + 60.0
    clock.advance(59)
    assert not breaker.allow()
    clock.advance(1)
    assert breaker.allow()
    assert breaker.state == "half_open"


def test_half_open_admits_at_most_success_threshold_trials_at_once(clock):
    """In half-open only success_threshold trials may be in flight; a report frees a slot."""
    breaker = make(clock, success_threshold=3)
    trip(breaker)
    clock.advance(60)
    assert [breaker.allow() for _ in range(5)] == [True, True, True, False, False]
    breaker.record_success()
    assert breaker.allow()
    assert not breaker.allow()


def test_release_frees_a_trial_slot_without_counting(clock):
    """release() (the call said nothing about the provider) frees a slot, counts nothing."""
    breaker = make(clock, success_threshold=2)
    trip(breaker)
    clock.advance(60)
    assert breaker.allow() and breaker.allow()
    assert not breaker.allow()
    breaker.release()
    assert breaker.allow()
    assert breaker.state == "half_open"
    assert breaker.snapshot()["failures"] == breaker.failure_threshold


def test_a_trial_that_never_reports_is_presumed_lost_after_the_recovery_timeout(clock):
    """A trial slot whose call never reported is freed after recovery_timeout seconds."""
    breaker = make(clock, success_threshold=1, recovery_timeout=30.0)
    trip(breaker)
    clock.advance(30)
    assert breaker.allow()
    clock.advance(29)
    assert not breaker.allow()
    clock.advance(1)
    assert breaker.allow()


def test_half_open_limits_trials_across_threads(clock):
    """Eight threads asking at the same instant in half-open: exactly success_threshold pass."""
    breaker = make(clock, success_threshold=3)
    trip(breaker)
    clock.advance(60)
    barrier = threading.Barrier(8)
    answers = []

    def ask():
        barrier.wait()
        answers.append(breaker.allow())

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert sorted(answers) == [False] * 5 + [True] * 3


# -- adaptive thresholds -------------------------------------------------------------------

def test_a_healthy_provider_trips_after_fewer_failures(clock):
    """After a healthy window (>= 99% successes over min_calls), a burst trips at the tight threshold."""
    breaker = make(clock, failure_threshold=6, min_threshold=2, min_calls=10)
    succeed(breaker, 20)
    assert breaker.snapshot()["threshold"] == 3
    fail(breaker, 2)
    assert breaker.state == "closed"
    assert breaker.snapshot()["threshold"] == 3    # the burst itself does not loosen it
    fail(breaker, 1)
    assert breaker.state == "open"


def test_the_tight_threshold_is_never_below_min_threshold(clock):
    """failure_threshold // 2 is raised to min_threshold."""
    breaker = make(clock, failure_threshold=3, min_threshold=2)
    succeed(breaker, 10)
    assert breaker.snapshot()["threshold"] == 2


def test_without_enough_calls_the_threshold_stays_at_failure_threshold(clock):
    """Fewer than min_calls outcomes say nothing about health: the threshold is failure_threshold."""
    breaker = make(clock, failure_threshold=5, min_calls=10)
    succeed(breaker, 9)
    assert breaker.snapshot()["threshold"] == 5
    fail(breaker, 4)
    assert breaker.state == "closed"


def test_an_unhealthy_window_keeps_the_full_threshold(clock):
    """Below 99% successes the threshold stays at failure_threshold."""
    breaker = make(clock, failure_threshold=5, window=100)
    for _ in range(4):
        succeed(breaker, 9)
        fail(breaker, 1)
    succeed(breaker, 1)
    assert breaker.snapshot()["threshold"] == 5
    assert breaker.snapshot()["success_rate"] == pytest.approx(37 / 41)


def test_failure_rate_trips_even_when_failures_are_not_consecutive(clock):
    """With failure_rate of the window's calls (at least min_calls) failing, it opens."""
    breaker = make(clock, failure_rate=0.5, min_calls=10)
    for _ in range(4):
        succeed(breaker, 1)
        fail(breaker, 1)
    succeed(breaker, 1)
    assert breaker.state == "closed"        # 4 of 9: too few calls and below the rate
    fail(breaker, 1)
    assert breaker.state == "open"          # 5 of 10
    assert breaker.snapshot()["failures"] == 1


def test_the_window_keeps_only_the_last_calls(clock):
    """Outcomes older than the last `window` calls no longer count."""
    breaker = make(clock, window=10, failure_rate=0.5, min_calls=10)
    for _ in range(4):
        fail(breaker, 1)
        succeed(breaker, 1)
    succeed(breaker, 10)
    snap = breaker.snapshot()
    assert snap["calls_in_window"] == 10
    assert snap["success_rate"] == 1.0


def test_the_window_starts_afresh_after_recovery(clock):
    """Closing after half-open clears the window, so the outage no longer counts."""
    breaker = make(clock, min_calls=10)
    for _ in range(4):
        succeed(breaker, 1)
        fail(breaker, 1)
    trip(breaker)
    clock.advance(60)
    succeed(breaker, 3)
    assert breaker.snapshot()["calls_in_window"] == 0
    fail(breaker, 1)
    assert breaker.state == "closed"


def test_not_adaptive_counts_only_consecutive_failures(clock):
    """adaptive_thresholds=False: no tightening after a healthy window, no failure-rate trip."""
    breaker = make(clock, adaptive_thresholds=False, failure_threshold=5)
    succeed(breaker, 50)
    assert breaker.snapshot()["threshold"] == 5
    fail(breaker, 4)
    assert breaker.state == "closed"
    for _ in range(50):
        succeed(breaker, 1)
        fail(breaker, 3)
    assert breaker.state == "closed"
    fail(breaker, 2)
    assert breaker.state == "open"


# -- cool-down and retry_at ----------------------------------------------------------------

def test_cool_down_skips_the_provider_without_opening(clock):
    """cool_down(s) refuses calls for s seconds while the state stays closed."""
    breaker = make(clock)
    breaker.cool_down(30)
    assert not breaker.allow()
    snap = breaker.snapshot()
    assert snap["state"] == "closed"
    assert snap["retry_in"] == 30
    assert breaker.retry_at() == clock.now + 30
    clock.advance(29.9)
    assert not breaker.allow()
    clock.advance(0.1)
    assert breaker.allow()
    assert breaker.snapshot()["retry_in"] == 0


def test_a_shorter_cool_down_does_not_cut_a_longer_one(clock):
    """The later end of two cool-downs wins; zero or negative seconds do nothing."""
    breaker = make(clock)
    breaker.cool_down(30)
    breaker.cool_down(5)
    breaker.cool_down(0)
    assert breaker.retry_at() == clock.now + 30


def test_retry_at_is_the_end_of_the_recovery_period_when_open(clock):
    """Open: retry_at is opened_at + recovery_timeout; closed and not cooling: now."""
    breaker = make(clock, recovery_timeout=60.0)
    assert breaker.retry_at() == clock.now
    opened_at = clock.now
    trip(breaker)
    clock.advance(10)
    assert breaker.retry_at() == opened_at + 60
    assert breaker.snapshot()["retry_in"] == 50
    clock.advance(55)
    assert breaker.retry_at() == clock.now
    assert breaker.snapshot()["retry_in"] == 0


def test_retry_at_is_the_later_of_recovery_and_cool_down(clock):
    """When both open and cooling, the provider is tried again at the later of the two."""
    breaker = make(clock, recovery_timeout=60.0)
    trip(breaker)
    breaker.cool_down(90)
    assert breaker.retry_at() == clock.now + 90
    clock.advance(60)
    assert not breaker.allow()
    assert breaker.state == "open"


# -- reset and the board -------------------------------------------------------------------

def test_reset_closes_and_clears_everything(clock):
    """reset() closes the circuit and clears failures, window and cool-down."""
    breaker = make(clock)
    succeed(breaker, 3)
    trip(breaker)
    breaker.cool_down(100)
    breaker.reset()
    assert breaker.snapshot() == {"state": "closed", "failures": 0, "threshold": 5,
                                  "success_rate": 1.0, "calls_in_window": 0, "retry_in": 0.0}
    assert breaker.allow()


def test_board_holds_one_breaker_per_provider(clock):
    """BreakerBoard builds a breaker per name with the same settings; iteration yields them."""
    board = BreakerBoard(["a", "b"], TWO_STRIKES, clock=clock)
    assert [b.name for b in board] == ["a", "b"]
    assert board.get("a") is not board.get("b")
    fail(board.get("a"), 2)
    assert board.snapshot()["a"]["state"] == "open"
    assert board.snapshot()["b"]["state"] == "closed"
    with pytest.raises(KeyError):
        board.get("nope")


def test_board_resets_one_breaker(clock):
    """reset(name) closes only that provider's breaker."""
    board = BreakerBoard(["a", "b"], TWO_STRIKES, clock=clock)
    fail(board.get("a"), 2)
    fail(board.get("b"), 2)
    board.reset("a")
    assert board.get("a").state == "closed"
    assert board.get("b").state == "open"


def test_board_resets_all_breakers(clock):
    """reset() with no name closes every breaker."""
    board = BreakerBoard(["a", "b"], TWO_STRIKES, clock=clock)
    fail(board.get("a"), 2)
    fail(board.get("b"), 2)
    board.reset()
    assert {s["state"] for s in board.snapshot().values()} == {"closed"}


def test_board_reset_of_an_unknown_provider_raises_key_error(clock):
    """Resetting a name the board does not hold is a KeyError (the API turns it into a 404)."""
    board = BreakerBoard(["a"], clock=clock)
    with pytest.raises(KeyError):
        board.reset("b")


def test_board_gives_each_breaker_its_own_storage(clock):
    """storage_factory(name) builds each breaker's pybreaker storage."""
    made = {}

    def factory(name):
        made[name] = pybreaker.CircuitMemoryStorage(pybreaker.STATE_CLOSED)
        return made[name]

    board = BreakerBoard(["a", "b"], CircuitBreakerSettings(adaptive_thresholds=False), clock=clock,
                         storage_factory=factory)
    fail(board.get("b"), 5)
    assert made["a"].state == pybreaker.STATE_CLOSED
    assert made["b"].state == pybreaker.STATE_OPEN


def test_invalid_settings_are_refused(clock):
    """Thresholds, window and timeouts below their minimum raise ValueError."""
    for bad in ({"failure_threshold": 0}, {"success_threshold": 0}, {"window": 0},
                {"recovery_timeout": 0}, {"failure_rate": 0}, {"failure_rate": 1.5},
                {"min_calls": 0}, {"min_threshold": 0}):
        with pytest.raises(ValueError):
            make(clock, **bad)
    with pytest.raises(ValueError):
        BreakerBoard(["a", "a"])


# -- listeners and logs --------------------------------------------------------------------

def test_listeners_see_each_transition(clock):
    """Every state change reaches the listeners as (breaker name, old, new)."""
    recorder = Recorder()
    breaker = make(clock, listeners=[recorder], adaptive_thresholds=False, failure_threshold=2,
                   success_threshold=1)
    fail(breaker, 2)
    clock.advance(60)
    fail(breaker, 1)
    clock.advance(60)
    succeed(breaker, 1)
    fail(breaker, 2)
    breaker.reset()
    breaker.reset()
    assert recorder.changes == [
        ("up", "closed", "open"), ("up", "open", "half_open"), ("up", "half_open", "open"),
        ("up", "open", "half_open"), ("up", "half_open", "closed"), ("up", "closed", "open"),
        ("up", "open", "closed"),
    ]


def test_a_broken_or_partial_listener_does_not_break_the_breaker(clock, caplog):
    """A listener without state_change is skipped; one that raises is logged and ignored."""
    class Broken:
        def state_change(self, name, old, new):
            raise RuntimeError("metrics down")

    recorder = Recorder()
    breaker = make(clock, listeners=[object(), Broken()], adaptive_thresholds=False, failure_threshold=1)
    breaker.add_listener(recorder)
    with caplog.at_level(logging.ERROR, logger="llm_proxy.breakers"):
        fail(breaker, 1)
    assert breaker.state == "open"
    assert recorder.changes == [("up", "closed", "open")]
    assert "listener" in caplog.text


def test_state_changes_are_logged_at_warning(clock, caplog):
    """Each transition is one WARNING on the llm_proxy.breakers logger."""
    breaker = make(clock, adaptive_thresholds=False, failure_threshold=1)
    with caplog.at_level(logging.WARNING, logger="llm_proxy.breakers"):
        fail(breaker, 1)
    records = [r for r in caplog.records if r.name == "llm_proxy.breakers"]
    assert [(r.levelno, r.getMessage()) for r in records] == [
        (logging.WARNING, "circuit breaker up: closed -> open")]


# -- concurrency ---------------------------------------------------------------------------

def run_threads(target, count):
    errors = []

    def guarded(index):
        try:
            target(index)
        except BaseException as exc:    # surfaced in the test thread below
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    assert errors == []


def test_concurrent_records_keep_exact_counts(clock):
    """8 threads x 2000 outcomes: the window holds every one and the success rate is exact."""
    breaker = make(clock, window=16_000, failure_threshold=10_000)

    def work(index):
        for i in range(2000):
            assert breaker.allow()
            if i % 4 == 0:
                breaker.record_failure()
            else:
                breaker.record_success()

    run_threads(work, 8)
    snap = breaker.snapshot()
    assert snap["state"] == "closed"
    assert snap["calls_in_window"] == 16_000
    assert snap["success_rate"] == 0.75


def test_concurrent_trips_and_recoveries_stay_consistent():
    """Threads tripping and recovering the breaker leave it in a valid, recoverable state."""
    clock = FakeClock()
    tick = threading.Lock()
    breaker = make(clock, failure_threshold=4, success_threshold=2, recovery_timeout=1.0,
                   window=50)

    def work(index):
        rng = random.Random(index)
        for _ in range(2000):
            if rng.random() < 0.05:
                with tick:
                    clock.advance(0.25)
            if breaker.allow():
                if rng.random() < 0.4:
                    breaker.record_failure()
                else:
                    breaker.record_success()
            snap = breaker.snapshot()
            assert snap["state"] in ("closed", "open", "half_open")
            assert 0 <= snap["calls_in_window"] <= 50
            assert 0.0 <= snap["success_rate"] <= 1.0

    run_threads(work, 8)
    clock.advance(2)                    # past any recovery period and any lost trial
    for _ in range(3):
        if breaker.state == "closed":
            break
        succeed(breaker, 1)
    assert breaker.state == "closed"


def test_calls_between_allow_and_record_run_in_parallel():
    """allow() and record_*() never hold a lock across the call: 4 x 0.2 s take about 0.2 s."""
    breaker = ProviderBreaker("up")
    barrier = threading.Barrier(4)

    def call(index):
        barrier.wait()
        assert breaker.allow()
        time.sleep(0.2)                 # the provider call
        breaker.record_success()

    started = time.perf_counter()
    run_threads(call, 4)
    elapsed = time.perf_counter() - started
    assert elapsed < 0.6
    assert breaker.snapshot()["calls_in_window"] == 4


def test_half_open_trials_run_in_parallel(clock):
    """Trials admitted in half-open are in flight together, not one after another."""
    breaker = make(clock, success_threshold=3)
    trip(breaker)
    clock.advance(60)
    barrier = threading.Barrier(3)

    def trial(index):
        barrier.wait()
        assert breaker.allow()
        time.sleep(0.2)
        breaker.record_success()

    started = time.perf_counter()
    run_threads(trial, 3)
    assert time.perf_counter() - started < 0.5
    assert breaker.state == "closed"
