"""Per-key rate limits: requests per window, tokens per window (charged after the answer), and
requests in flight, with the X-RateLimit-* headers that describe them.

Algorithm: a token bucket per (key, limit). The bucket holds up to ``burst`` units (here always
one window's allowance, the limit itself) and refills continuously at ``limit / window`` units a
second. A request needs one unit and takes it; a refused request takes nothing.

Why a token bucket rather than GCRA. Both allow the same traffic; GCRA keeps one number (the
theoretical arrival time) and advances it by ``window / limit`` per request, a float that rounds
at the very edge this module promises to be exact about, and it expresses a debt (tokens charged
after the fact) less directly. The bucket here is kept as (credit, updated_at) in integers: time
in microseconds, and credit scaled so that one unit (a request, a token) is ``window`` in
microseconds of credit and the bucket gains ``limit`` credit per microsecond. Refill, spending,
comparison and the wait until enough credit are all integer arithmetic: no rounding drift
however the requests are spaced, and a debt is just credit below zero.

Exactness. Each decision is one call of ``LimitStore.take``, which reads, refills, decides and
writes under one lock (``MemoryLimitStore``), so no two requests can spend the same unit. Over
any interval of t seconds a key is admitted at most ``burst + t * limit / window`` requests:
from a full bucket exactly ``limit`` back to back, then one every ``window / limit`` seconds.
The N+1th request is told to retry after exactly the time its unit takes to refill.

Tokens: a request is admitted when the key has at least one token left (the request's cost is
not known yet); after the answer, ``charge_tokens`` takes what the upstream's usage reports,
which may drive the balance below zero, so the next requests wait until it refills. The debt is
not capped: over time a key gets ``tokens_per_minute`` on average.

A limit of None or 0 is unlimited: no bucket, no headers. In-flight counts are per process.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple, Protocol

from app.auth import Tenant
from app.errors import RateLimited

REQUESTS = "requests"
TOKENS = "tokens"

_HEADER_SUFFIX = {REQUESTS: "", TOKENS: "-Tokens"}
MICROSECONDS = 1_000_000  # per second: the stores keep time in whole microseconds


class Take(NamedTuple):
    """The outcome of one ``LimitStore.take``; times are seconds from ``now``."""
    allowed: bool
    remaining: float     # units left after the operation; below 0 is a debt
    retry_after: float   # until the bucket holds ``need`` units; 0 when allowed
    reset_after: float   # until the bucket is full again


class LimitStore(Protocol):
    """Where the buckets and in-flight counts live; each method is one atomic operation.

    A shared store (e.g. Redis, one Lua script per ``take``) must use a clock shared by every
    process (wall time) and give in-flight counts a lease so a crashed process's slots expire.
    """

    def take(self, key: str, *, limit: int, window: float, burst: int, cost: int,
             need: int | None, now: float) -> Take:
        """Refill the bucket to ``now``; if it holds ``need`` units, subtract ``cost`` units.

        The bucket refills ``limit`` units per ``window`` seconds up to ``burst``; ``need``
        None means the cost is always subtracted (a charge after the fact). Atomic.
        """

    def enter(self, key: str, limit: int) -> tuple[bool, int]:
        """Count one more holder unless ``limit`` are in already: (allowed, holders now)."""

    def leave(self, key: str) -> None:
        """One holder fewer."""


class MemoryLimitStore:
    """Buckets in a dict under one lock; entries are dropped once they would be full anyway.

    A bucket left alone refills to full, which is the same as no entry, so every
    ``sweep_interval`` seconds (of the callers' clock) the entries whose full time has passed
    are removed: memory is bounded by the keys active within about a window plus one interval.
    """

    def __init__(self, *, sweep_interval: float = 60.0):
        self.sweep_interval = sweep_interval
        self._buckets: dict[str, tuple[int, int, int]] = {}  # credit, updated, full at (µs)
        self._in_flight: dict[str, int] = {}
        self._next_sweep: int | None = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._buckets) + len(self._in_flight)

    def take(self, key, *, limit, window, burst, cost, need, now) -> Take:
        unit = round(window * MICROSECONDS)  # credit per unit; refill is `limit` per µs
        full = burst * unit
        t = round(now * MICROSECONDS)
        with self._lock:
            self._sweep(t)
            credit, updated, _ = self._buckets.get(key, (full, t, t))
            if t > updated:
                credit, updated = min(full, credit + (t - updated) * limit), t
            allowed = need is None or credit >= need * unit
            if allowed:
                credit -= cost * unit
            reset_us = -(-(full - credit) // limit)                  # ceiling division
            if reset_us > 0:
                self._buckets[key] = (credit, updated, updated + reset_us)
            else:
                self._buckets.pop(key, None)
        retry_us = 0 if allowed else -(-(need * unit - credit) // limit)
        return Take(allowed, credit / unit, retry_us / MICROSECONDS, reset_us / MICROSECONDS)

    def enter(self, key, limit) -> tuple[bool, int]:
        with self._lock:
            held = self._in_flight.get(key, 0)
            if held >= limit:
                return False, held
            self._in_flight[key] = held + 1
            return True, held + 1

    def leave(self, key) -> None:
        with self._lock:
            held = self._in_flight.get(key, 0) - 1
            if held > 0:
                self._in_flight[key] = held
            else:
                self._in_flight.pop(key, None)

    def _sweep(self, t):
        if self._next_sweep is None:
            self._next_sweep = t + round(self.sweep_interval * MICROSECONDS)
        elif t >= self._next_sweep:
            self._buckets = {k: e for k, e in self._buckets.items() if e[2] > t}
            self._next_sweep = t + round(self.sweep_interval * MICROSECONDS)


@dataclass(frozen=True)
class Decision:
    """Where a key stands against one limit after a check, and the headers that say so.

    Headers (requests; the tokens limit uses the same names ending in ``-Tokens``):
    ``X-RateLimit-Limit``: the limit per window. ``X-RateLimit-Remaining``: how many more could
    be admitted right now, back to back (whole units, never below 0). ``X-RateLimit-Reset``:
    whole seconds, rounded up, until the bucket is full again (Remaining = Limit); 0 when full.
    On a refusal also ``Retry-After``: whole seconds, rounded up and at least 1, until the next
    request would be admitted (for tokens: until the balance is back to one token).
    """

    kind: str
    allowed: bool
    limit: int | None           # None: unlimited
    remaining: float = 0.0
    retry_after: float = 0.0
    reset_after: float = 0.0

    def headers(self) -> dict[str, str]:
        if self.limit is None:
            return {}
        s = _HEADER_SUFFIX[self.kind]
        out = {
            f"X-RateLimit-Limit{s}": str(self.limit),
            f"X-RateLimit-Remaining{s}": str(max(0, math.floor(self.remaining))),
            f"X-RateLimit-Reset{s}": str(math.ceil(self.reset_after)),
        }
        if not self.allowed:
            out["Retry-After"] = str(max(1, math.ceil(self.retry_after)))
        return out


class Admission:
    """A request let in by ``RateLimiter.admit``: its headers and its in-flight slot."""

    def __init__(self, limiter: RateLimiter, tenant: Tenant, decisions: list[Decision]):
        self.tenant = tenant
        self.decisions = decisions
        self._limiter = limiter
        self._held = True
        self._lock = threading.Lock()

    def headers(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for decision in self.decisions:
            out.update(decision.headers())
        return out

    def release(self) -> None:
        """Free the in-flight slot; later calls do nothing."""
        self.finish(0)

    def finish(self, tokens: int) -> None:
        """The answer ended: charge the tokens it used and free the in-flight slot (once)."""
        with self._lock:
            held, self._held = self._held, False
        if held:
            if tokens > 0:
                self._limiter.charge_tokens(self.tenant, tokens)
            self._limiter.release(self.tenant)


class RateLimiter:
    """The limits of a tenant (see ``Tenant``): checks before the call, charges after it.

    ``window`` is the period the per-minute limits refer to (60 s; other values are for tests
    and special deployments). Every method is thread-safe; state lives in ``store``.
    """

    def __init__(self, store: LimitStore | None = None, *,
                 clock: Callable[[], float] = time.monotonic, window: float = 60.0):
        if window <= 0:
            raise ValueError("window must be positive")
        self.store = store if store is not None else MemoryLimitStore(sweep_interval=window)
        self.clock = clock
        self.window = window

    def admit(self, tenant: Tenant) -> Admission:
        """Token budget, in-flight slot, then one request: RateLimited if any says no.

        A refused request costs nothing: the request unit is taken last, and the in-flight slot
        is given back if it is refused. The caller must ``release()`` the admission once the
        answer (or the stream) has ended, and charge the tokens it used.
        """
        tokens = self.check_tokens(tenant)
        self.acquire(tenant)
        try:
            requests = self.check_request(tenant)
        except BaseException:
            self.release(tenant)
            raise
        return Admission(self, tenant, [requests, tokens])

    def check_request(self, tenant: Tenant) -> Decision:
        """Take one request from the tenant's requests-per-window bucket, or raise RateLimited."""
        limit = tenant.requests_per_minute
        if not limit:
            return Decision(REQUESTS, True, None)
        decision = self._take(REQUESTS, tenant, limit, cost=1, need=1)
        if not decision.allowed:
            raise RateLimited(
                f"Rate limit reached for {_who(tenant)}: {limit} requests {self._per()}. "
                f"Retry in {decision.headers()['Retry-After']} s.", headers=decision.headers())
        return decision

    def check_tokens(self, tenant: Tenant) -> Decision:
        """Whether the tenant has at least one token left this window; takes nothing."""
        limit = tenant.tokens_per_minute
        if not limit:
            return Decision(TOKENS, True, None)
        decision = self._take(TOKENS, tenant, limit, cost=0, need=1)
        if not decision.allowed:
            raise RateLimited(
                f"Token limit reached for {_who(tenant)}: {limit} tokens {self._per()}, used up "
                f"by earlier answers. Retry in {decision.headers()['Retry-After']} s.",
                headers=decision.headers())
        return decision

    def charge_tokens(self, tenant: Tenant, tokens: int) -> Decision:
        """Charge what an answer used; the balance may go below zero. Never raises."""
        limit = tenant.tokens_per_minute
        if not limit:
            return Decision(TOKENS, True, None)
        return self._take(TOKENS, tenant, limit, cost=max(0, int(tokens)), need=None)

    def acquire(self, tenant: Tenant) -> None:
        """Hold one of the tenant's in-flight slots, or raise RateLimited."""
        limit = tenant.max_in_flight
        if not limit:
            return
        allowed, _ = self.store.enter(f"in_flight:{tenant.id}", limit)
        if not allowed:
            raise RateLimited(
                f"Too many requests in flight for {_who(tenant)}: the limit is {limit}. "
                f"Retry when one has finished.",
                code="too_many_concurrent_requests", headers={"Retry-After": "1"})

    def release(self, tenant: Tenant) -> None:
        """Give back a slot taken by ``acquire``."""
        if tenant.max_in_flight:
            self.store.leave(f"in_flight:{tenant.id}")

    def _take(self, kind, tenant, limit, *, cost, need) -> Decision:
        took = self.store.take(f"{kind}:{tenant.id}", limit=limit, window=self.window,
                               burst=limit, cost=cost, need=need, now=self.clock())
        return Decision(kind, took.allowed, limit, took.remaining, took.retry_after,
                        took.reset_after)

    def _per(self) -> str:
        return "per minute" if self.window == 60 else f"per {self.window:g} s"


def _who(tenant: Tenant) -> str:
    return "anonymous clients" if tenant.anonymous else f"API key {tenant.id!r}"
