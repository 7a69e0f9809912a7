"""waitress's worker threads, started as requests need them and stopped when idle.

waitress starts every one of ``server.threads`` at once and keeps them for good: the production
profile's 256 threads held 3.8 MB of an idle proxy's RSS (6.5 MB once each had served a
request), though a steady load of 16 clients keeps 16 or so busy. ``ElasticDispatcher`` starts
``floor`` threads, adds one whenever a request arrives and no thread is free (up to the limit,
``server.threads``, so a burst of streams still gets a thread each), and lets a thread that
found no work for ``idle_seconds`` end while more than ``floor`` run: after a burst the count
goes back to the floor. Threads are started by a thread of the dispatcher's own, never by
waitress's loop: ``Thread.start`` waits until the new thread runs, which under a loaded GIL can
take milliseconds, and the loop serves every connection. The rest is waitress's own
``ThreadedTaskDispatcher``: its queue, its lock and counters, and its shutdown.
"""

from __future__ import annotations

import threading

from waitress.task import ThreadedTaskDispatcher

FLOOR = 4  # threads kept when idle
IDLE_SECONDS = 5.0  # an extra thread with no work this long ends


class ElasticDispatcher(ThreadedTaskDispatcher):

    def __init__(self, limit: int, *, floor: int = FLOOR, idle_seconds: float = IDLE_SECONDS):
        super().__init__()
        self.limit = limit
        self.floor = min(floor, limit)
        self.idle_seconds = idle_seconds
        self._wanted = 0  # threads asked of the grower, not yet started
        self._closed = False
        self._grow = threading.Condition(self.lock)
        self.set_thread_count(self.floor)
        threading.Thread(target=self._start_wanted, name="llm-proxy-thread-starter",
                         daemon=True).start()

    def running(self) -> int:
        """Threads running now (those told to stop left out)."""
        with self.lock:
            return len(self.threads) - self.stop_count

    def add_task(self, task) -> None:
        with self.lock:
            self.queue.append(task)
            running = len(self.threads) - self.stop_count
            free = running - self.active_count + self._wanted
            if len(self.queue) > free and running + self._wanted < self.limit \
                    and not self.stop_count:
                self._wanted += 1
                free += 1
                self._grow.notify()
            self.queue_cv.notify()
            if len(self.queue) > free:
                self.queue_logger.warning("Task queue depth is %d", len(self.queue) - free)

    def shutdown(self, cancel_pending=True, timeout=5):
        with self.lock:
            self._closed = True
            self._grow.notify()
        return super().shutdown(cancel_pending=cancel_pending, timeout=timeout)

    def _start_wanted(self) -> None:
        """The grower: start the threads ``add_task`` asked for, one at a time."""
        while True:
            with self.lock:
                while not self._wanted and not self._closed:
                    self._grow.wait()
                if self._closed:
                    return
                number = 0  # numbered as set_thread_count numbers them
                while number in self.threads:
                    number += 1
                self.threads.add(number)
                self.active_count += 1  # busy, as waitress counts a thread until it first waits
                self._wanted -= 1  # (counted busy while it starts: at worst one more is asked)
            self.start_new_thread(self.handler_thread, number)

    def handler_thread(self, thread_no) -> None:
        """waitress's loop, but a wait for work ends after ``idle_seconds``: a thread still
        without work then ends, unless only ``floor`` threads run."""
        while True:
            with self.lock:
                while not self.queue and self.stop_count == 0:
                    self.active_count -= 1
                    woken = self.queue_cv.wait(self.idle_seconds)
                    self.active_count += 1
                    if (not woken and not self.queue and not self.stop_count
                            and len(self.threads) > self.floor):
                        self.active_count -= 1
                        self.threads.discard(thread_no)
                        self.thread_exit_cv.notify()
                        return
                if self.stop_count > 0:
                    self.active_count -= 1
                    self.stop_count -= 1
                    self.threads.discard(thread_no)
                    self.thread_exit_cv.notify()
                    return
                task = self.queue.popleft()
            try:
                task.service()
            except BaseException:
                self.logger.exception("Exception when servicing %r", task)
