"""The server's worker threads (app/runtime/dispatcher.py): started as requests need them, up to
the limit, and back to the floor once idle."""

from __future__ import annotations

import http.client
import threading
import time

import pytest

from app.runtime.dispatcher import ElasticDispatcher
from app.runtime.server import served_in_thread


class Held:
    """A task that runs until released; counts how many are running."""

    running = 0
    lock = threading.Lock()

    def __init__(self, release: threading.Event, done: list):
        self.release, self.done = release, done

    def service(self):
        with Held.lock:
            Held.running += 1
        try:
            assert self.release.wait(10)
        finally:
            with Held.lock:
                Held.running -= 1
        self.done.append(self)

    def cancel(self):
        self.done.append(None)


def until(predicate, seconds=10.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


@pytest.fixture
def dispatcher():
    made = []

    def make(limit, kind=ElasticDispatcher, **options):
        made.append(kind(limit, **options))
        return made[-1]

    yield make
    for d in made:
        d.shutdown(timeout=5)


def test_threads_grow_to_the_burst_and_go_back_to_the_floor_once_idle(dispatcher):
    d = dispatcher(64, floor=2, idle_seconds=0.1)
    assert d.running() == 2
    release, done = threading.Event(), []
    for _ in range(20):
        d.add_task(Held(release, done))
    assert until(lambda: Held.running == 20)  # each request got a thread of its own at once
    assert 20 <= d.running() <= 21  # one more may be asked while one starts
    release.set()
    assert until(lambda: len(done) == 20)
    assert until(lambda: d.running() == 2)  # the extra threads ended after idle_seconds


def test_never_more_threads_than_the_limit_and_the_rest_wait_their_turn(dispatcher, caplog):
    d = dispatcher(4, floor=1, idle_seconds=0.1)
    release, done = threading.Event(), []
    for _ in range(6):
        d.add_task(Held(release, done))
    assert until(lambda: Held.running == 4)
    assert d.running() == 4 and len(d.queue) == 2
    assert "Task queue depth is" in caplog.text  # waitress's own warning, as before
    release.set()
    assert until(lambda: len(done) == 6) and None not in done


def test_waitress_loop_never_waits_for_a_thread_to_start(dispatcher):
    """add_task runs in waitress's loop, which serves every connection: the threads it asks
    for are started by the dispatcher's own thread, however long a start takes."""
    gate = threading.Event()

    class SlowToStart(ElasticDispatcher):
        def start_new_thread(self, target, thread_no):
            if thread_no > 0:  # the floor's thread starts at once
                assert gate.wait(10)
            super().start_new_thread(target, thread_no)

    d = dispatcher(8, SlowToStart, floor=1, idle_seconds=1.0)
    release, done = threading.Event(), []
    began = time.monotonic()
    for _ in range(3):
        d.add_task(Held(release, done))
    assert time.monotonic() - began < 1.0  # returned while the starts wait for the gate
    assert until(lambda: Held.running == 1) and Held.running == 1
    gate.set()
    assert until(lambda: Held.running == 3)
    release.set()
    assert until(lambda: len(done) == 3)


def test_an_idle_floor_thread_never_ends_and_shutdown_stops_every_thread(dispatcher):
    d = dispatcher(8, floor=3, idle_seconds=0.02)
    time.sleep(0.2)  # ten idle periods
    assert d.running() == 3
    release, done = threading.Event(), []
    for _ in range(5):
        d.add_task(Held(release, done))
    assert until(lambda: Held.running == 5)
    release.set()
    assert until(lambda: len(done) == 5)
    d.shutdown(timeout=5)
    assert not d.threads


def test_a_served_proxy_holds_the_floor_of_threads_while_idle(make_app):
    app = make_app([{"name": "mock", "type": "mock", "models": ["m"]}], server={"threads": 64})
    before = {t for t in threading.enumerate() if t.name.startswith("waitress-")}
    with served_in_thread(app) as url:
        conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=5)
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200
        conn.close()
        started = {t for t in threading.enumerate() if t.name.startswith("waitress-")} - before
        assert 1 <= len(started) <= 4  # of 64: the floor, not every thread at once
