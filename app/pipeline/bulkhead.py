"""Bulkheads: limits on calls in flight that refuse at once instead of queueing."""

from __future__ import annotations

import threading


class Bulkhead:
    """At most ``limit`` holders at a time; ``try_acquire`` never waits."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_flight = 0
        self._lock = threading.Lock()

    def try_acquire(self) -> bool:
        with self._lock:
            if self.in_flight >= self.limit:
                return False
            self.in_flight += 1
            return True

    def release(self) -> None:
        with self._lock:
            self.in_flight -= 1
