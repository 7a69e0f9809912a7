"""Bounded TTL caches for serialized answers, their request keys, and request coalescing.

A `ByteCache` holds `bytes` values under string keys, bounded at once by entry count and by an
approximate byte budget, with LRU eviction, TTL expiry and an optional stale-if-error window.
`Coalescer` makes identical concurrent misses compute once and share the answer.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass

import orjson
from cachetools import Cache, TTLCache

# Approximate bytes one entry costs beyond its key and value characters: the cachetools
# data/size/link dicts and link node, the Entry object, and the str/bytes object headers.
# Measured about 250 bytes of structures per entry with tracemalloc (CPython 3.11), plus
# about 80 bytes of object headers for the key and the value.
ENTRY_OVERHEAD = 320

MB = 1024 * 1024
KEY_SCOPE, SHARED_SCOPE = "key", "shared"  # the ``cache.scope`` setting


@dataclass(frozen=True, slots=True)
class Entry:
    """One cached value: the bytes, when they were stored (clock units), and their accounted size."""

    value: bytes
    stored_at: float
    size: int

    def age(self, now: float) -> float:
        return now - self.stored_at


def entry_size(key: str, value: bytes) -> int:
    """Accounted bytes for one entry: key length + value length + ENTRY_OVERHEAD."""
    return len(key) + len(value) + ENTRY_OVERHEAD


class _Store(TTLCache):
    """A TTLCache that counts what it drops: TTL expirations and evictions for room.

    cachetools routes every internal expiry through `self.expire` and every eviction through
    `self.popitem`, so overriding those two counts each removal exactly once.
    """

    def __init__(self, maxsize, ttl, timer):
        super().__init__(maxsize, ttl, timer=timer, getsizeof=_sizeof)
        self.expirations = 0
        self.evictions = 0

    def expire(self, time=None):
        expired = super().expire(time)
        self.expirations += len(expired)
        return expired

    def popitem(self):
        item = super().popitem()
        self.evictions += 1
        return item

    def peek(self, key):
        """The entry for key without touching its recency (caller has expired first)."""
        if key not in self:
            return None
        return Cache.__getitem__(self, key)


def _sizeof(entry: Entry) -> int:
    return entry.size


class ByteCache:
    """A thread-safe LRU + TTL cache of `bytes`, bounded by entries and by bytes.

    Both bounds are exact: the backing cachetools `TTLCache` uses `getsizeof` so its `maxsize`
    is the byte budget (it evicts LRU entries until a new one fits), and `set` itself evicts
    LRU entries while the entry count is at `maxsize`. Sizes are approximate per-entry costs:
    `len(key) + len(value) + ENTRY_OVERHEAD` (see `entry_size`).

    Stale-if-error: entries live in the store for `ttl + stale_ttl`. `get` serves an entry only
    while it is fresh (age < ttl); between ttl and ttl + stale_ttl only `get_stale` returns it.
    Stale entries stay in the one store, so they count against both bounds and are evicted in
    LRU order like any other; a `get` on them is a miss and does not refresh their recency.

    One lock guards every access; no caller code runs under it.

    ``scope`` says whose entries it holds: "key" (each API key its own) or "shared" (every
    key's); the callers that make its keys read it (``cache_scope``).
    """

    def __init__(self, name: str, maxsize: int, ttl: float, max_bytes: int,
                 clock=time.monotonic, stale_ttl: float = 0.0, scope: str = "key"):
        if maxsize < 1 or max_bytes < 1:
            raise ValueError("maxsize and max_bytes must be at least 1")
        if ttl <= 0 or stale_ttl < 0:
            raise ValueError("ttl must be positive and stale_ttl non-negative")
        if scope not in (KEY_SCOPE, SHARED_SCOPE):
            raise ValueError("scope must be 'key' or 'shared'")
        self.name = name
        self.scope = scope
        self.maxsize = int(maxsize)
        self.max_bytes = int(max_bytes)
        self.ttl = float(ttl)
        self.stale_ttl = float(stale_ttl)
        self._store = _Store(self.max_bytes, self.ttl + self.stale_ttl, clock)
        self._lock = threading.Lock()
        self._hits = self._misses = self._stale_hits = self._rejected = 0

    def get(self, key: str, max_age: float | None = None) -> Entry | None:
        """The fresh entry for key, or None (a miss). `max_age` also rejects older entries."""
        with self._lock:
            store = self._store
            with store.timer as now:
                store.expire(now)
                entry = store.peek(key)
                if entry is None or not self._fresh(entry, now) or (
                        max_age is not None and entry.age(now) > max_age):
                    self._misses += 1
                    return None
                store[key]  # refresh LRU recency
                self._hits += 1
                return entry

    def get_stale(self, key: str) -> Entry | None:
        """The entry for key if held at all, fresh or within the stale window; not a hit."""
        with self._lock:
            store = self._store
            with store.timer as now:
                store.expire(now)
                entry = store.peek(key)
                if entry is not None:
                    self._stale_hits += 1
                return entry

    def set(self, key: str, value: bytes) -> bool:
        """Store value; False (counted as rejected) if the entry alone exceeds the byte budget.

        A refused value also drops any older value for the key: the caller meant to replace it.
        """
        if not isinstance(value, bytes):
            raise TypeError(f"{self.name} cache stores bytes, not {type(value).__name__}")
        size = entry_size(key, value)
        with self._lock:
            store = self._store
            with store.timer as now:
                store.expire(now)
                if size > self.max_bytes:
                    self._rejected += 1
                    store.pop(key, None)
                    return False
                if key not in store:
                    while len(store) >= self.maxsize:
                        store.popitem()
                store[key] = Entry(value, now, size)  # evicts LRU entries for bytes
                return True

    def delete(self, key: str) -> bool:
        """Remove key; True if it was held (fresh or stale)."""
        with self._lock:
            store = self._store
            with store.timer as now:
                store.expire(now)
                return store.pop(key, None) is not None

    def clear(self) -> None:
        """Drop every entry (not counted as evictions or expirations); keeps the counters."""
        with self._lock:
            self._store.clear()

    def expire(self) -> int:
        """Drop entries past their stale window; the number dropped."""
        with self._lock:
            return len(self._store.expire())

    def shrink(self, fraction: float) -> int:
        """Evict LRU entries until at most `fraction` of the byte budget is used; the count."""
        if not 0.0 <= fraction <= 1.0:
            raise ValueError("fraction must be between 0 and 1")
        target = fraction * self.max_bytes
        with self._lock:
            store = self._store
            evicted = 0
            with store.timer:
                while store.currsize > target and len(store):
                    store.popitem()
                    evicted += 1
            return evicted

    def __len__(self) -> int:
        """Entries held, fresh or stale."""
        with self._lock:
            return len(self._store)

    def stats(self) -> dict:
        with self._lock:
            store = self._store
            with store.timer:
                entries, used = len(store), store.currsize
            lookups = self._hits + self._misses
            return {
                "hits": self._hits,
                "misses": self._misses,
                "hit_rate": self._hits / lookups if lookups else 0.0,
                "stale_hits": self._stale_hits,
                "entries": entries,
                "bytes": used,
                "memory_mb": round(used / MB, 3),
                "evictions": store.evictions,
                "expirations": store.expirations,
                "rejected": self._rejected,
                "max_entries": self.maxsize,
                "max_bytes": self.max_bytes,
            }

    def _fresh(self, entry: Entry, now: float) -> bool:
        return now < entry.stored_at + self.ttl


def request_key(endpoint: str, body: dict, ignore=("stream", "user", "stream_options"), *,
                scope: str = "") -> str:
    """Hex sha256 of the endpoint and the body minus fields that do not change the answer, and
    of ``scope`` (whose answer it is: an API key's id; "" for one every key shares)."""
    kept = {k: v for k, v in body.items() if k not in ignore}
    digest = hashlib.sha256(endpoint.encode())
    digest.update(b"\n")
    if scope:  # without one, the key is what it always was (entries kept in Redis still hit)
        digest.update(b"scope:" + scope.encode() + b"\n")
    digest.update(orjson.dumps(kept, option=orjson.OPT_SORT_KEYS))
    return digest.hexdigest()


def cache_scope(scope: str, tenant) -> str:
    """What a cache key is scoped to (``request_key``'s ``scope``): the tenant's id when each
    API key has its own entries (``cache.scope: key``), "" when every key shares them."""
    if scope == SHARED_SCOPE or tenant is None:
        return ""
    return tenant.id


class CacheSet:
    """The proxy's two caches, by name: "response" and "summary"."""

    def __init__(self, response: ByteCache, summary: ByteCache):
        self.response = response
        self.summary = summary

    def get(self, name: str) -> ByteCache:
        if name not in ("response", "summary"):
            raise KeyError(name)
        return getattr(self, name)

    def stats(self) -> dict:
        return {"response_cache": self.response.stats(), "summary_cache": self.summary.stats()}

    def clear(self, name: str | None = None) -> None:
        for cache in (self.response, self.summary) if name is None else (self.get(name),):
            cache.clear()

    def expire(self) -> int:
        return self.response.expire() + self.summary.expire()


def caches_for(settings, *, max_memory_mb: float | None = None,
               clock=time.monotonic) -> CacheSet:
    """Both caches from the ``cache`` settings section; ``max_memory_mb`` overrides its budget
    (the small local fallback behind Redis)."""
    return build_caches(
        max_memory_mb=settings.max_memory_mb if max_memory_mb is None else max_memory_mb,
        response_size=settings.response_cache_size, response_ttl=settings.response_cache_ttl,
        summary_size=settings.summary_cache_size, summary_ttl=settings.summary_cache_ttl,
        stale_ttl=settings.stale_ttl, clock=clock, scope=settings.scope)


def build_caches(max_memory_mb=512, response_size=10000, response_ttl=1800, summary_size=2000,
                 summary_ttl=3600, stale_ttl=0.0, clock=time.monotonic,
                 response_share=0.8, scope="key") -> CacheSet:
    """Both caches, sharing `max_memory_mb`: 80% to responses, 20% to summaries by default.

    The response cache holds five times the entries (10,000 vs 2,000) and full completion
    bodies, larger than summaries, so it gets the matching share (~42 KB per entry at 512 MB).
    """
    if not 0.0 < response_share < 1.0:
        raise ValueError("response_share must be between 0 and 1")
    budget = int(max_memory_mb * MB)
    response_bytes = int(budget * response_share)
    return CacheSet(
        ByteCache("response", response_size, response_ttl, response_bytes, clock, stale_ttl,
                  scope),
        ByteCache("summary", summary_size, summary_ttl, budget - response_bytes, clock,
                  stale_ttl, scope),
    )


class _Flight:
    __slots__ = ("done", "ok", "value", "waiters")

    def __init__(self):
        self.done = threading.Event()
        self.ok = False
        self.value = None
        self.waiters = 0


class Coalescer:
    """Identical concurrent computations run once; the callers that wait share the value.

    `run(key, compute, timeout)`: the first caller for a key (the leader) calls `compute()`
    outside any lock; callers arriving while it runs wait up to `timeout` seconds in total and
    get the leader's value (`shared=True`). A waiter whose time runs out computes for itself.
    If the leader raises, the exception goes to the leader only; its waiters loop and the first
    of them back becomes the new leader and the rest wait on it (within their original
    timeout), so a failing upstream sees one call at a time rather than a stampede. A waiter
    that wakes only after the retry has finished leads once more. The value is shared as-is:
    return immutable values (bytes). `stats()["waiting"]` counts callers blocked on a live
    computation. Typical use: on a cache miss, `run(key, fetch_and_store, timeout)`.
    """

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._flights: dict[str, _Flight] = {}
        self._counts = {"leaders": 0, "shared": 0, "timeouts": 0, "leader_failures": 0}

    def run(self, key: str, compute, timeout: float):
        """(value, shared): compute once per key in flight; waiters share the leader's value."""
        deadline = self._clock() + timeout
        while True:
            with self._lock:
                flight = self._flights.get(key)
                leader = flight is None
                if leader:
                    flight = self._flights[key] = _Flight()
                    self._counts["leaders"] += 1
                else:
                    flight.waiters += 1
            if leader:
                return self._lead(key, flight, compute), False
            remaining = deadline - self._clock()
            finished = remaining > 0 and flight.done.wait(remaining)
            with self._lock:
                flight.waiters -= 1
                if not finished:
                    self._counts["timeouts"] += 1
                elif flight.ok:
                    self._counts["shared"] += 1
            if not finished:
                return compute(), False
            if flight.ok:
                return flight.value, True
            # The leader failed: go round; the first waiter back leads the retry.

    def _lead(self, key, flight, compute):
        try:
            flight.value = compute()
            flight.ok = True
            return flight.value
        except BaseException:
            with self._lock:
                self._counts["leader_failures"] += 1
            raise
        finally:
            with self._lock:
                if self._flights.get(key) is flight:
                    del self._flights[key]
            flight.done.set()

    def in_flight(self) -> int:
        with self._lock:
            return len(self._flights)

    def stats(self) -> dict:
        with self._lock:
            waiting = sum(flight.waiters for flight in self._flights.values())
            return {**self._counts, "in_flight": len(self._flights), "waiting": waiting}
