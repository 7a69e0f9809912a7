"""Circuit breaker state in Redis for several proxy processes, with a local copy that answers
while Redis is away."""

from __future__ import annotations

import threading
import time
from typing import Callable

import pybreaker

from app.state.store import LOCAL, PREFIX, RedisGuard, locally

IDLE_TTL = 24 * 3600.0  # seconds a breaker's keys outlive their last write


class FallbackRedisStorage(pybreaker.CircuitBreakerStorage):
    """A pybreaker storage in Redis with the keys of pybreaker's ``CircuitRedisStorage`` (so
    plain pybreaker processes can share it), whose every Redis call goes through the guard and,
    when Redis is unavailable, answers from an in-memory copy instead of raising or
    forgetting: each value read or written is kept locally, so a breaker that was open stays
    open through a Redis outage.

    Reads are served from that copy for ``max_age`` seconds after the last read or write: a
    breaker asks its state and counter on every call, and three Redis round trips a request
    halved pass-through throughput; another process's trip is seen within ``max_age``.

    Nothing is written until there is something to keep: missing keys read as a closed
    breaker without failures (as pybreaker reads them), so a breaker that never failed costs
    Redis nothing, and model breakers, named by clients' model names, leave no trace for the
    models that are fine. Every write gives the keys ``ttl`` seconds more (None: they stay): a
    breaker no process has written to for that long has nothing worth keeping. A process that
    finds the state gone while it knows the circuit is not closed (Redis restarted empty)
    writes it back.
    """

    def __init__(self, client, guard: RedisGuard, namespace: str,
                 state: str = pybreaker.STATE_CLOSED, *, max_age: float = 0.5,
                 clock: Callable[[], float] = time.monotonic, ttl: float | None = None):
        self._ex = max(1, int(ttl)) if ttl else None
        self._guard = guard
        self._lock = threading.Lock()
        self._local = {"state": state, "fail_counter": 0, "success_counter": 0,
                       "opened_at": None}
        self._fresh_until: dict[str, float] = {}
        self._max_age = max_age
        self._clock = clock
        self._prefix = f"{namespace}:pybreaker:"  # CircuitRedisStorage's keys
        super().__init__("redis")

    def _namespace(self, key: str) -> str:
        return self._prefix + key

    @property
    def state(self) -> str:
        def read(c):
            raw = c.get(self._namespace("state"))
            if raw is None:  # never written, expired, or lost (Redis restarted empty)
                with self._lock:
                    known = self._local["state"]
                if known != pybreaker.STATE_CLOSED:  # put back what this process knows
                    c.set(self._namespace("state"), known, nx=True, ex=self._ex)
                return known
            return raw.decode()
        return self._remote("state", read)

    @state.setter
    def state(self, state: str) -> None:
        self._write("state", str(state),
                    lambda c: c.set(self._namespace("state"), str(state), ex=self._ex))

    def increment_counter(self) -> None:
        self._bump("fail_counter")

    def reset_counter(self) -> None:
        self._write("fail_counter", 0,
                    lambda c: c.set(self._namespace("fail_counter"), 0, ex=self._ex))

    def increment_success_counter(self) -> None:
        self._bump("success_counter")

    def reset_success_counter(self) -> None:
        self._write("success_counter", 0,
                    lambda c: c.set(self._namespace("success_counter"), 0, ex=self._ex))

    @property
    def counter(self) -> int:
        return self._remote("fail_counter", lambda c: int(c.get(self._namespace("fail_counter"))
                                                          or 0))

    @property
    def success_counter(self) -> int:
        return self._remote("success_counter",
                            lambda c: int(c.get(self._namespace("success_counter")) or 0))

    @property
    def opened_at(self):
        with self._lock:
            return self._local["opened_at"]

    @opened_at.setter
    def opened_at(self, now) -> None:
        # ProviderBreaker times recovery itself; kept for pybreaker readers, latest wins.
        with self._lock:
            self._local["opened_at"] = now
        stamp = int(now.timestamp())
        self._guard.run(lambda c: c.eval(
            "local v = redis.call('GET', KEYS[1]) "
            "if not v or tonumber(v) < tonumber(ARGV[1]) then "
            "redis.call('SET', KEYS[1], ARGV[1]) end "
            "if tonumber(ARGV[2]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[2]) end",
            1, self._namespace("opened_at"), stamp, self._ex or 0), locally)

    def _remote(self, name, read):
        now = self._clock()
        with self._lock:
            if now < self._fresh_until.get(name, 0.0):
                return self._local[name]
        value = self._guard.run(read, locally)
        with self._lock:
            if value is LOCAL:
                return self._local[name]
            self._local[name] = value
            self._fresh_until[name] = now + self._max_age
            return value

    def _write(self, name, value, write):
        with self._lock:
            self._local[name] = value
            self._fresh_until[name] = self._clock() + self._max_age
        self._guard.run(write, locally)

    def _bump(self, name):
        def bump(c):
            if self._ex is None:
                return c.incr(self._namespace(name))
            pipe = c.pipeline(transaction=False)
            pipe.incr(self._namespace(name))
            pipe.expire(self._namespace(name), self._ex)
            return pipe.execute()[0]
        value = self._guard.run(bump, locally)
        with self._lock:
            self._local[name] = self._local[name] + 1 if value is LOCAL else int(value)
            self._fresh_until[name] = self._clock() + self._max_age


def redis_breaker_storage(client, name: str, prefix: str = PREFIX, *,
                          guard: RedisGuard | None = None, max_age: float = 0.5,
                          clock: Callable[[], float] = time.monotonic,
                          ttl: float | None = IDLE_TTL) -> FallbackRedisStorage:
    """The shared storage of breaker ``name`` (a provider's, or ``provider/model`` for a
    model's), for ``BreakerBoard(storage_factory=)``.

    Keys ``{prefix}breaker:{name}:pybreaker:*``, dropped by Redis ``ttl`` seconds after their
    last write. Pass the guard the other stores use; without one, a private guard is made (it
    then counts and trips on its own). Reads are reused for ``max_age`` seconds of ``clock``.
    """
    guard = guard if guard is not None else RedisGuard(client)
    return FallbackRedisStorage(client, guard, f"{prefix}breaker:{name}", max_age=max_age,
                                clock=clock, ttl=ttl)
