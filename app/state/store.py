"""Redis for several proxy processes: the client, the guard every call goes through, and the
shared caches (rate limits: ``redis_limits``; breaker state: ``redis_breakers``), each falling
back to its in-process store while Redis is down or slow.

Every Redis call goes through one ``RedisGuard``: a circuit breaker around Redis itself. While
it is open, callers use their local store at once (no connection attempt); after
``recovery_timeout`` one trial call goes to Redis and, if it succeeds, everything goes back.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
import zlib
from typing import Callable

import redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from app.cache import ByteCache, Entry, entry_size
from app.pipeline.breakers import CLOSED, ProviderBreaker
from settings import CircuitBreakerSettings

log = logging.getLogger("llm_proxy.redis")

PREFIX = "llmproxy:"


def connect(url: str, *, pool_size: int, clock: Callable[[], float] = time.monotonic,
            timeout: float = 0.1, failure_threshold: int = 3,
            recovery_timeout: float = 5.0) -> tuple[redis.Redis, RedisGuard]:
    """A Redis client for ``url`` and the guard every call of this module goes through.

    Short socket timeouts (``timeout`` seconds, connect and read) bound what a dead or stalled
    Redis costs a request. ``pool_size``: the waitress thread count, so a thread never waits
    for a connection; four more are added for background threads (metrics scrapes, the memory
    manager), since past its size the pool raises, which the guard would count as Redis
    failing. Bytes in and out (pybreaker's storage needs ``decode_responses=False``). One
    retry, without backoff, on a connection error only: it replaces a pooled connection that a
    Redis restart has closed; a timed-out command is not retried (it may have run: a retried
    rate-limit decision would spend twice).
    """
    client = redis.Redis.from_url(
        url, max_connections=max(1, pool_size) + 4, socket_timeout=timeout,
        socket_connect_timeout=timeout, decode_responses=False, health_check_interval=0,
        retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)))
    guard = RedisGuard(client, clock=clock, failure_threshold=failure_threshold,
                       recovery_timeout=recovery_timeout, timeout=timeout)
    return client, guard


LOCAL = object()  # what a guarded call returns when it was served by the fallback


def locally():
    """The fallback of a guarded call whose caller serves it from its local store: ``LOCAL``."""
    return LOCAL


class RedisGuard:
    """A circuit breaker around Redis, and the count of what it served locally instead.

    ``run(op, fallback)`` calls ``op(client)`` while Redis is healthy and ``fallback()`` when
    the breaker is open or the call fails (any ``RedisError`` or ``OSError``). The breaker is a
    ``ProviderBreaker`` (consecutive failures only, one half-open trial): ``failure_threshold``
    failures in a row open it for ``recovery_timeout`` seconds of ``clock``. A call that
    succeeds but takes longer than ``timeout`` seconds (of ``clock`` too) counts as a failure
    (its result is still used), so a Redis that answers but slowly is also left alone; None
    turns that off.
    """

    def __init__(self, client, *, clock: Callable[[], float] = time.monotonic,
                 failure_threshold: int = 3, recovery_timeout: float = 5.0,
                 timeout: float | None = 0.05):
        self.client = client
        self.timeout = timeout
        self._clock = clock
        self._breaker = ProviderBreaker("redis", CircuitBreakerSettings(
            failure_threshold=failure_threshold, recovery_timeout=recovery_timeout,
            success_threshold=1, adaptive_thresholds=False), clock=clock)
        self._breaker.add_listener(self)
        self._lock = threading.Lock()
        self._counts = {"calls": 0, "fallbacks": 0, "errors": 0, "slow": 0}

    def run(self, op: Callable, fallback: Callable):
        """``op(client)`` through the breaker, or ``fallback()`` if Redis is open or failing."""
        if not self._breaker.allow():
            self._count("fallbacks")
            return fallback()
        started = self._clock()
        try:
            result = op(self.client)
        except (RedisError, OSError) as e:
            self._breaker.record_failure()
            self._count("errors", "fallbacks")
            log.debug("redis call failed: %r", e)
            return fallback()
        except BaseException:
            self._breaker.release()
            raise
        if self.timeout is not None and self._clock() - started > self.timeout:
            self._breaker.record_failure()
            self._count("slow")
        else:
            self._breaker.record_success()
        self._count("calls")
        return result

    @property
    def state(self) -> str:
        """"closed" (using Redis), "open" (serving locally) or "half_open"."""
        return self._breaker.state

    @property
    def fallbacks(self) -> int:
        with self._lock:
            return self._counts["fallbacks"]

    @property
    def errors(self) -> int:
        with self._lock:
            return self._counts["errors"]

    def stats(self) -> dict:
        with self._lock:
            return {"state": self._breaker.state, **self._counts}

    def state_change(self, name, old, new):
        """Breaker listener: log the change; on opening, drop the idle pooled connections so the
        trial after recovery dials afresh instead of finding sockets a restart has closed."""
        if new == CLOSED:
            log.warning("redis is back: shared state in use again")
        elif old == CLOSED:
            log.warning("redis unavailable: serving from in-process stores")
        if new != CLOSED:
            pool = getattr(self.client, "connection_pool", None)
            try:
                if pool is not None:
                    pool.disconnect(inuse_connections=False)
            except Exception:  # closing dead sockets must never fail a request
                log.debug("redis pool disconnect failed", exc_info=True)

    def _count(self, *names):
        with self._lock:
            for name in names:
                self._counts[name] += 1


# -- the response and summary caches -------------------------------------------------------

_HEADER = struct.Struct(">Bd")  # flag (0 raw, 1 zlib), stored_at (seconds of the shared clock)
_RAW, _ZLIB = 0, 1
COMPRESS_MIN = 1024   # below this zlib saves little and costs a call
COMPRESS_GAIN = 0.9   # keep the compressed form only if at most 90% of the raw size


def pack(value: bytes, stored_at: float) -> bytes:
    """The stored form: a one-byte flag, the store time, the value (zlib level 1 if it pays)."""
    if len(value) >= COMPRESS_MIN:
        packed = zlib.compress(value, 1)
        if len(packed) <= COMPRESS_GAIN * len(value):
            return _HEADER.pack(_ZLIB, stored_at) + packed
    return _HEADER.pack(_RAW, stored_at) + value


def unpack(data: bytes) -> tuple[bytes, float]:
    """(value, stored_at) from ``pack``'s form."""
    flag, stored_at = _HEADER.unpack_from(data)
    body = data[_HEADER.size:]
    return (zlib.decompress(body) if flag == _ZLIB else body), stored_at


class RedisByteCache:
    """A ``ByteCache`` kept in Redis and shared by every process; ``local`` while Redis is down.

    Same public interface as ``ByteCache``. Each entry is one string key
    ``{prefix}cache:{name}:{key}`` written with ``SET ... PX (ttl + stale_ttl)``, so Redis drops
    it after its stale window; the value carries its store time, so ``get`` applies the
    freshness (age < ttl) and ``max_age`` rules and ``get_stale`` the stale window exactly as
    ``ByteCache`` does. Values of 1 KB or more are stored zlib-compressed (level 1) when that
    saves at least 10%.

    Times. ``clock`` is the shared clock written into Redis: wall time (``time.time``), since
    ages are compared across processes and machines (their clock skew shows as that much error
    in an entry's age). Returned entries carry ``stored_at`` in ``local_clock`` units (the
    caller's clock, e.g. ``time.monotonic``), so ``entry.age(local_clock())`` is right.

    Budget. Redis does not let a client bound one prefix's bytes: the shared budget is Redis's
    own ``maxmemory``, with ``maxmemory-policy allkeys-lru`` recommended (a GET refreshes an
    entry's recency there as ``ByteCache.get`` does). ``max_bytes`` here only refuses a single
    value too big for it; the entry count is not bounded beyond memory.

    While Redis is unavailable every call goes to ``local`` (an in-process ``ByteCache``):
    entries stored then stay local; nothing is written to both. ``clear``/``delete`` act on both.
    ``expire``/``shrink`` act on ``local`` only: Redis expires its keys itself, and a process
    under memory pressure has nothing of its own to free in Redis.

    Stats. hits/misses/stale_hits/rejected are this process's counts (sum them across
    processes). ``entries`` is the shared count of this cache's keys, found by SCAN at most once
    per ``count_interval`` seconds (a SCAN walks the whole keyspace, so counting per scrape would
    cost every process a keyspace walk) and at most ``count_limit`` keys examined per count
    (``entries_exact`` is False if it stopped early); every process reports the same figure (use
    max, not sum). ``bytes``/``memory_mb``/``evictions``/``expirations`` are the local store's:
    what this process holds in memory.
    """

    backend = "redis"

    def __init__(self, name: str, guard: RedisGuard, local: ByteCache, *, ttl: float,
                 stale_ttl: float = 0.0, max_bytes: int, prefix: str = PREFIX,
                 clock: Callable[[], float] = time.time,
                 local_clock: Callable[[], float] = time.monotonic,
                 count_interval: float = 30.0, count_limit: int = 100_000):
        if ttl <= 0 or stale_ttl < 0:
            raise ValueError("ttl must be positive and stale_ttl non-negative")
        self.name = name
        self.guard = guard
        self.local = local
        self.ttl = float(ttl)
        self.stale_ttl = float(stale_ttl)
        self.max_bytes = int(max_bytes)
        self.maxsize = local.maxsize
        self.scope = local.scope  # whose entries (ByteCache.scope): the keys carry it
        self.prefix = f"{prefix}cache:{name}:"
        self.count_interval = count_interval
        self.count_limit = count_limit
        self._clock = clock
        self._local_clock = local_clock
        self._px = max(1, int(round((self.ttl + self.stale_ttl) * 1000)))
        self._lock = threading.Lock()
        self._counts = {"hits": 0, "misses": 0, "stale_hits": 0, "rejected": 0, "fallbacks": 0}
        self._entries: tuple[float, int, bool] | None = None  # counted at (local clock), n, exact

    def get(self, key: str, max_age: float | None = None) -> Entry | None:
        """The fresh entry for key, or None (a miss). ``max_age`` also rejects older entries."""
        found = self.guard.run(lambda c: c.get(self.prefix + key), locally)
        if found is LOCAL:
            self._count("fallbacks")
            entry = self.local.get(key, max_age)
        else:
            entry, age = self._entry(key, found, self.ttl)
            if entry is not None and max_age is not None and age > max_age:
                entry = None
        self._count("misses" if entry is None else "hits")
        return entry

    def get_stale(self, key: str) -> Entry | None:
        """The entry for key if held at all, fresh or within the stale window; not a hit."""
        found = self.guard.run(lambda c: c.get(self.prefix + key), locally)
        if found is LOCAL:
            self._count("fallbacks")
            entry = self.local.get_stale(key)
        else:
            entry, _ = self._entry(key, found, self.ttl + self.stale_ttl)
        if entry is not None:
            self._count("stale_hits")
        return entry

    def set(self, key: str, value: bytes) -> bool:
        """Store value; False (counted as rejected) if it alone exceeds ``max_bytes``.

        A refused value also drops any older value for the key, as ``ByteCache.set`` does.
        """
        if not isinstance(value, bytes):
            raise TypeError(f"{self.name} cache stores bytes, not {type(value).__name__}")
        if entry_size(key, value) > self.max_bytes:
            self._count("rejected")
            self.delete(key)
            return False
        data = pack(value, self._clock())
        done = self.guard.run(lambda c: c.set(self.prefix + key, data, px=self._px), locally)
        if done is LOCAL:
            self._count("fallbacks")
            return self.local.set(key, value)
        return True

    def delete(self, key: str) -> bool:
        """Remove key from Redis and from the local store; True if either held it."""
        removed = self.guard.run(lambda c: c.delete(self.prefix + key) > 0, locally)
        if removed is LOCAL:
            self._count("fallbacks")
            removed = False
        return self.local.delete(key) or removed

    def clear(self) -> None:
        """Drop every entry of this cache, in Redis (for every process) and locally."""
        self.guard.run(self._clear_redis, locally)
        self.local.clear()
        with self._lock:
            self._entries = None

    def expire(self) -> int:
        """Redis expires its own keys; this drops the local store's expired entries."""
        return self.local.expire()

    def shrink(self, fraction: float) -> int:
        """Shrink the local store only: Redis memory is bounded by Redis's maxmemory policy."""
        return self.local.shrink(fraction)

    def __len__(self) -> int:
        """Entries: the shared count (see the class docstring), or the local one without Redis."""
        counted = self._count_entries()
        return counted[0] if counted is not None else len(self.local)

    def stats(self) -> dict:
        local = self.local.stats()
        counted = self._count_entries()
        with self._lock:
            counts = dict(self._counts)
        lookups = counts["hits"] + counts["misses"]
        return {
            "backend": self.backend,
            "hits": counts["hits"],
            "misses": counts["misses"],
            "hit_rate": counts["hits"] / lookups if lookups else 0.0,
            "stale_hits": counts["stale_hits"],
            "entries": counted[0] if counted is not None else local["entries"],
            "entries_exact": counted[1] if counted is not None else True,
            "bytes": local["bytes"],
            "memory_mb": local["memory_mb"],
            "evictions": local["evictions"],
            "expirations": local["expirations"],
            "rejected": counts["rejected"],
            "fallbacks": counts["fallbacks"],
            "redis": self.guard.state,
            "local": {k: local[k] for k in ("hits", "misses", "entries", "bytes")},
            "max_entries": self.maxsize,
            "max_bytes": self.max_bytes,
        }

    # -- helpers -----------------------------------------------------------------------------

    def _entry(self, key, data, window) -> tuple[Entry | None, float]:
        """(entry, age) if ``data`` is younger than ``window`` seconds, else (None, age)."""
        if data is None:
            return None, 0.0
        value, stored_at = unpack(data)
        age = self._clock() - stored_at
        if age >= window:
            return None, age
        return Entry(value, self._local_clock() - age, entry_size(key, value)), age

    def _count(self, name):
        with self._lock:
            self._counts[name] += 1

    def _clear_redis(self, client):
        batch = []
        for key in client.scan_iter(match=_glob(self.prefix) + "*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                client.unlink(*batch)
                batch.clear()
        if batch:
            client.unlink(*batch)

    def _count_entries(self) -> tuple[int, bool] | None:
        now = self._local_clock()
        with self._lock:
            cached = self._entries
        if cached is not None and now - cached[0] < self.count_interval:
            return cached[1], cached[2]
        counted = self.guard.run(self._scan_count, locally)
        if counted is LOCAL:
            return (cached[1], cached[2]) if cached is not None else None
        with self._lock:
            self._entries = (now, *counted)
        return counted

    def _scan_count(self, client) -> tuple[int, bool]:
        count, examined, cursor = 0, 0, 0
        while True:
            cursor, keys = client.scan(cursor, match=_glob(self.prefix) + "*", count=1000)
            count += len(keys)
            examined += 1000
            if cursor == 0:
                return count, True
            if examined >= self.count_limit:
                return count, False


def _glob(text: str) -> str:
    """``text`` with SCAN MATCH's special characters escaped."""
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)
