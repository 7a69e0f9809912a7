"""Shared state in Redis for several proxy processes: the caches, the rate-limit buckets and the
circuit breakers, each falling back to its in-process store while Redis is down or slow.

Every Redis call goes through one ``RedisGuard``: a circuit breaker around Redis itself. While
it is open, callers use their local store at once (no connection attempt); after
``recovery_timeout`` one trial call goes to Redis and, if it succeeds, everything goes back.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import threading
import time
import zlib
from typing import Callable

import pybreaker
import redis
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError
from redis.retry import Retry

from app.breakers import CLOSED, ProviderBreaker
from app.cache import MB, ByteCache, Entry, entry_size
from app.limits import _US, MemoryLimitStore, Take

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


_LOCAL = object()  # what a guarded call returns when it was served by the fallback


def _locally():
    return _LOCAL


class RedisGuard:
    """A circuit breaker around Redis, and the count of what it served locally instead.

    ``run(op, fallback)`` calls ``op(client)`` while Redis is healthy and ``fallback()`` when
    the breaker is open or the call fails (any ``RedisError`` or ``OSError``). The breaker is a
    ``ProviderBreaker`` (consecutive failures only, one half-open trial): ``failure_threshold``
    failures in a row open it for ``recovery_timeout`` seconds of ``clock``. A call that
    succeeds but takes longer than ``timeout`` seconds counts as a failure too (its result is
    still used), so a Redis that answers but slowly is also left alone; None turns that off.
    """

    def __init__(self, client, *, clock: Callable[[], float] = time.monotonic,
                 failure_threshold: int = 3, recovery_timeout: float = 5.0,
                 timeout: float | None = 0.05):
        self.client = client
        self.timeout = timeout
        self._breaker = ProviderBreaker(
            "redis", failure_threshold=failure_threshold, recovery_timeout=recovery_timeout,
            success_threshold=1, adaptive=False, clock=clock)
        self._breaker.add_listener(self)
        self._lock = threading.Lock()
        self._counts = {"calls": 0, "fallbacks": 0, "errors": 0, "slow": 0}

    def run(self, op: Callable, fallback: Callable):
        """``op(client)`` through the breaker, or ``fallback()`` if Redis is open or failing."""
        if not self._breaker.allow():
            self._count("fallbacks")
            return fallback()
        started = time.perf_counter()
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
        if self.timeout is not None and time.perf_counter() - started > self.timeout:
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
        found = self.guard.run(lambda c: c.get(self.prefix + key), _locally)
        if found is _LOCAL:
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
        found = self.guard.run(lambda c: c.get(self.prefix + key), _locally)
        if found is _LOCAL:
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
        done = self.guard.run(lambda c: c.set(self.prefix + key, data, px=self._px), _locally)
        if done is _LOCAL:
            self._count("fallbacks")
            return self.local.set(key, value)
        return True

    def delete(self, key: str) -> bool:
        """Remove key from Redis and from the local store; True if either held it."""
        removed = self.guard.run(lambda c: c.delete(self.prefix + key) > 0, _locally)
        if removed is _LOCAL:
            self._count("fallbacks")
            removed = False
        return self.local.delete(key) or removed

    def clear(self) -> None:
        """Drop every entry of this cache, in Redis (for every process) and locally."""
        self.guard.run(self._clear_redis, _locally)
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
        counted = self.guard.run(self._scan_count, _locally)
        if counted is _LOCAL:
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


# -- rate limits -----------------------------------------------------------------------------

# One decision, atomically: the bucket refilled to `t`, `cost` units spent if `need` are there
# (need < 0: always), written back with an expiry at the time it would be full (no key = full).
# Integer arithmetic exactly as MemoryLimitStore.take. Lua numbers are doubles: every value
# stays an integer below 2^53 (time in µs ~1.7e15; credit ~ burst * window_µs), ceil_div
# corrects the float quotient, and integers are written with %.0f (tostring keeps 14 digits).
_TAKE = """
local function ceil_div(a, b)
  local q = math.floor(a / b)
  if q * b < a then q = q + 1 elseif (q - 1) * b >= a then q = q - 1 end
  return q
end
local limit, unit, full = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local t, cost, need = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local credit, updated = full, t
local raw = redis.call('GET', KEYS[1])
if raw then
  local sep = string.find(raw, ' ', 1, true)
  credit = tonumber(string.sub(raw, 1, sep - 1))
  updated = tonumber(string.sub(raw, sep + 1))
end
if t > updated then
  local gap = full - credit
  if gap <= 0 or t - updated >= ceil_div(gap, limit) then
    credit = full
  else
    credit = credit + (t - updated) * limit
  end
  updated = t
end
local allowed = need < 0 or credit >= need * unit
if allowed then credit = credit - cost * unit end
local reset_us = ceil_div(full - credit, limit)
if reset_us > 0 then
  redis.call('SET', KEYS[1], string.format('%.0f %.0f', credit, updated),
             'PX', string.format('%.0f', ceil_div(reset_us, 1000)))
else
  redis.call('DEL', KEYS[1])
end
local retry_us = 0
if not allowed then retry_us = ceil_div(need * unit - credit, limit) end
return {allowed and 1 or 0, string.format('%.0f', credit), retry_us, reset_us}
"""

# One in-flight slot: leases in a sorted set scored by expiry (ms of the store's clock).
# Expired leases (a crashed process's slots) are dropped first; the key expires with the last.
_ENTER = """
local now, limit, lease = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
local held = redis.call('ZCARD', KEYS[1])
if held >= limit then return {0, held} end
redis.call('ZADD', KEYS[1], string.format('%.0f', now + lease), ARGV[4])
redis.call('PEXPIRE', KEYS[1], lease)
return {1, held + 1}
"""


class _Script:
    """A Lua script run with EVALSHA, and with EVAL when Redis does not have it (NOSCRIPT)."""

    def __init__(self, source: str):
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    def __call__(self, client, keys, args):
        try:
            return client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return client.eval(self.source, len(keys), *keys, *args)  # caches it in Redis too


class RedisLimitStore:
    """A ``LimitStore`` in Redis: every process's decisions on one bucket per key, exactly.

    ``take`` is one Lua script per decision (read, refill, decide, write: atomic in Redis), with
    ``MemoryLimitStore``'s token-bucket arithmetic, so across processes no two requests spend the
    same unit. The bucket key expires when the bucket would be full again. Time is the caller's
    ``now`` (``RateLimiter``'s clock; give it ``time.time``): tests can inject a clock, and the
    cost is that machines' clock skew moves refills by as much (NTP keeps it to milliseconds; a
    caller whose clock is behind the bucket's last update refills nothing until it catches up,
    so skew never mints units). Redis ``TIME`` would remove the skew but not the injection.

    In-flight slots are leases in a sorted set: ``enter`` drops expired leases and adds one
    (expiring after ``lease`` seconds of ``clock``, longer than the longest request), ``leave``
    removes one this process holds (never below zero), so a crashed process's slots come back
    after ``lease``. While Redis is unavailable every call goes to ``local``; a slot taken
    locally is given back locally.
    """

    def __init__(self, guard: RedisGuard, local: MemoryLimitStore | None = None,
                 prefix: str = PREFIX, *, lease: float = 600.0,
                 clock: Callable[[], float] = time.time):
        self.guard = guard
        self.local = local if local is not None else MemoryLimitStore()
        self.prefix = f"{prefix}limit:"
        self.lease_ms = max(1, int(lease * 1000))
        self._clock = clock
        self._take = _Script(_TAKE)
        self._enter = _Script(_ENTER)
        self._lock = threading.Lock()
        self._held: dict[str, list[str | None]] = {}  # key -> lease members (None: local slot)
        self._serial = 0
        self._owner = f"{os.getpid()}:{id(self):x}"

    def take(self, key, *, limit, window, burst, cost, need, now) -> Take:
        unit = round(window * _US)
        full = burst * unit
        t = round(now * _US)
        args = (limit, unit, full, t, cost, -1 if need is None else need)
        out = self.guard.run(lambda c: self._take(c, [self.prefix + key], args), _locally)
        if out is _LOCAL:
            return self.local.take(key, limit=limit, window=window, burst=burst, cost=cost,
                                   need=need, now=now)
        allowed, credit, retry_us, reset_us = int(out[0]), int(out[1]), int(out[2]), int(out[3])
        return Take(bool(allowed), credit / unit, retry_us / _US, reset_us / _US)

    def enter(self, key, limit) -> tuple[bool, int]:
        with self._lock:
            self._serial += 1
            member = f"{self._owner}:{self._serial}"
        now_ms = int(self._clock() * 1000)
        args = (now_ms, limit, self.lease_ms, member)
        out = self.guard.run(
            lambda c: self._enter(c, [f"{self.prefix}{key}"], args), _locally)
        if out is _LOCAL:
            allowed, held = self.local.enter(key, limit)
            member = None
        else:
            allowed, held = bool(int(out[0])), int(out[1])
        if allowed:
            with self._lock:
                self._held.setdefault(key, []).append(member)
        return allowed, held

    def leave(self, key) -> None:
        with self._lock:
            members = self._held.get(key)
            if not members:
                return  # nothing held here: never below zero
            member = members.pop()
            if not members:
                del self._held[key]
        if member is None:
            self.local.leave(key)
        else:  # if Redis is down now, the lease expires on its own
            self.guard.run(lambda c: c.zrem(f"{self.prefix}{key}", member), _locally)

    def __len__(self) -> int:
        return len(self.local)


# -- circuit breakers ------------------------------------------------------------------------

class FallbackRedisStorage(pybreaker.CircuitRedisStorage):
    """pybreaker's ``CircuitRedisStorage`` (same keys, so plain pybreaker processes can share it)
    whose every Redis call goes through the guard and, when Redis is unavailable, answers from
    an in-memory copy instead of raising or forgetting: each value read or written is kept
    locally, so a breaker that was open stays open through a Redis outage.

    Reads are served from that copy for ``max_age`` seconds after the last read or write: a
    breaker asks its state and counter on every call, and three Redis round trips a request
    halved pass-through throughput; another process's trip is seen within ``max_age``.
    """

    def __init__(self, client, guard: RedisGuard, namespace: str,
                 state: str = pybreaker.STATE_CLOSED, *, max_age: float = 0.5,
                 clock: Callable[[], float] = time.monotonic):
        self._guard = guard
        self._lock = threading.Lock()
        self._local = {"state": state, "fail_counter": 0, "success_counter": 0,
                       "opened_at": None}
        self._fresh_until: dict[str, float] = {}
        self._max_age = max_age
        self._clock = clock
        super().__init__(state, client, namespace=namespace, fallback_circuit_state=state)

    def _initialize_redis_state(self, state: str) -> None:
        def init(c):
            pipe = c.pipeline(transaction=False)
            pipe.setnx(self._namespace("fail_counter"), 0)
            pipe.setnx(self._namespace("success_counter"), 0)
            pipe.setnx(self._namespace("state"), state)
            pipe.execute()
        self._guard.run(init, _locally)

    @property
    def state(self) -> str:
        def read(c):
            raw = c.get(self._namespace("state"))
            if raw is None:  # lost (Redis restarted empty): put back what this process knows
                with self._lock:
                    known = self._local["state"]
                c.setnx(self._namespace("state"), known)
                return known
            return raw.decode()
        return self._remote("state", read)

    @state.setter
    def state(self, state: str) -> None:
        self._write("state", str(state), lambda c: c.set(self._namespace("state"), str(state)))

    def increment_counter(self) -> None:
        self._bump("fail_counter")

    def reset_counter(self) -> None:
        self._write("fail_counter", 0, lambda c: c.set(self._namespace("fail_counter"), 0))

    def increment_success_counter(self) -> None:
        self._bump("success_counter")

    def reset_success_counter(self) -> None:
        self._write("success_counter", 0,
                    lambda c: c.set(self._namespace("success_counter"), 0))

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
            "if not v or tonumber(v) < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1]) end",
            1, self._namespace("opened_at"), stamp), _locally)

    def _remote(self, name, read):
        now = self._clock()
        with self._lock:
            if now < self._fresh_until.get(name, 0.0):
                return self._local[name]
        value = self._guard.run(read, _locally)
        with self._lock:
            if value is _LOCAL:
                return self._local[name]
            self._local[name] = value
            self._fresh_until[name] = now + self._max_age
            return value

    def _write(self, name, value, write):
        with self._lock:
            self._local[name] = value
            self._fresh_until[name] = self._clock() + self._max_age
        self._guard.run(write, _locally)

    def _bump(self, name):
        value = self._guard.run(lambda c: c.incr(self._namespace(name)), _locally)
        with self._lock:
            self._local[name] = self._local[name] + 1 if value is _LOCAL else int(value)
            self._fresh_until[name] = self._clock() + self._max_age


def redis_breaker_storage(client, name: str, prefix: str = PREFIX, *,
                          guard: RedisGuard | None = None, max_age: float = 0.5,
                          clock: Callable[[], float] = time.monotonic) -> FallbackRedisStorage:
    """The shared storage of provider ``name``'s breaker, for ``BreakerBoard(storage_factory=)``.

    Keys ``{prefix}breaker:{name}:pybreaker:*``. Pass the guard the other stores use; without
    one, a private guard is made (it then counts and trips on its own). Reads are reused for
    ``max_age`` seconds of ``clock``.
    """
    guard = guard if guard is not None else RedisGuard(client)
    return FallbackRedisStorage(client, guard, f"{prefix}breaker:{name}", max_age=max_age,
                                clock=clock)
