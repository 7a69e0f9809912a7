"""Per-key rate limits: requests per window, tokens per window (reserved at admission, settled
to the real usage after the answer), and requests in flight, with the X-RateLimit-* headers
that describe them.

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

Tokens: at admission a request reserves what it may spend (``reservation``: its prompt,
estimated, plus the most it may answer, ``max_tokens``) from the tokens bucket, in the same
atomic take that checks it, so concurrent requests cannot all be admitted on the last token:
at most as many run as the bucket covers. A request whose reservation alone exceeds the whole
limit reserves the whole limit: it runs from a full bucket (and is charged its real usage).
When the answer ends, the reservation is settled to the upstream's usage: what was reserved
but not used goes back (never past a full bucket), what was used beyond it is charged, which
may drive the balance below zero, so the next requests wait until it refills. The debt is not
capped: over time a key gets ``tokens_per_minute`` on average.

Several processes without a shared store (``WORKERS=N``, no Redis) each keep their own
buckets; each then enforces its ``WorkerShare`` of every limit (the shares add up to exactly
the limit), so the whole never exceeds what is configured. A key's in-flight requests without
a ``max_in_flight`` of its own are capped by ``in_flight_share``: this process's default share
of its request slots, so one tenant cannot take every slot from the others.

A limit of None or 0 is unlimited: no bucket, no headers (for ``max_in_flight``, None is the
default share and 0 unlimited; see ``Tenant``).
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
IN_FLIGHT = "in_flight"

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
        None means the cost is always subtracted (a charge after the fact; a negative cost
        gives units back, up to ``burst``). Atomic.
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
            if allowed:  # a negative cost gives units back: never past a full bucket
                credit = min(full, credit - cost * unit)
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
    ``X-RateLimit-Limit``: the limit per window (this worker's share of it, see
    ``WorkerShare``). ``X-RateLimit-Remaining``: how many more could be admitted right now,
    back to back (whole units, never below 0; for tokens, after this request's reservation).
    ``X-RateLimit-Reset``: whole seconds, rounded up, until the bucket is full again
    (Remaining = Limit); 0 when full. On a refusal also ``Retry-After``: whole seconds, rounded
    up and at least 1, until the request would be admitted (for tokens: until the bucket holds
    its reservation).
    """

    kind: str
    allowed: bool
    limit: int | None           # None: unlimited
    remaining: float = 0.0
    retry_after: float = 0.0
    reset_after: float = 0.0
    taken: int = 0              # units taken from the bucket (a reservation; < 0: given back)

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


@dataclass(frozen=True)
class WorkerShare:
    """This process's part of every per-key limit when N processes each keep their own buckets
    (``WORKERS=N`` without Redis): worker ``index`` of ``count`` enforces ``limit // count``,
    plus one when ``index < limit % count``, so the parts add up to exactly the limit and the
    deployment as a whole never admits more than is configured. A part may be 0 (a limit
    smaller than the count): that worker refuses the key. One worker of one has the whole.

    Why not the whole limit in each worker with a warning: N workers would admit N times the
    limit, and a limit that silently multiplies is no limit. The cost: a client whose
    connection lands on a worker with its part used up is refused while another has room.
    """

    index: int = 0
    count: int = 1

    def __post_init__(self):
        if not 0 <= self.index < self.count:
            raise ValueError(f"worker index {self.index} is not one of {self.count} workers")

    def of(self, limit: int) -> int:
        """This worker's part of ``limit``."""
        return limit // self.count + (1 if self.index < limit % self.count else 0)


class Admission:
    """A request let in by ``RateLimiter.admit``: its headers, its token reservation and its
    in-flight slot."""

    def __init__(self, limiter: RateLimiter, tenant: Tenant, decisions: list[Decision],
                 reserved: int = 0):
        self.tenant = tenant
        self.decisions = decisions
        self.reserved = reserved  # tokens taken at admission, settled by ``finish``
        self._limiter = limiter
        self._held = True
        self._lock = threading.Lock()

    def headers(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for decision in self.decisions:
            out.update(decision.headers())
        return out

    def release(self) -> None:
        """Free the in-flight slot and give the whole reservation back; later calls do nothing."""
        self.finish(0)

    def finish(self, tokens: int) -> None:
        """The answer ended having used ``tokens``: settle the reservation to them (what was
        not used goes back, anything beyond it is charged) and free the in-flight slot (once)."""
        with self._lock:
            held, self._held = self._held, False
        if held:
            try:
                self._limiter.settle_tokens(self.tenant, self.reserved, tokens)
            finally:
                self._limiter.release(self.tenant)


DEFAULT_COMPLETION_RESERVATION = 1024  # answer tokens reserved when a request sets no maximum


class RateLimiter:
    """The limits of a tenant (see ``Tenant``): checks and reservations before the call, the
    settlement after it.

    ``window`` is the period the per-minute limits refer to (60 s; other values are for tests
    and special deployments). ``share`` is this worker's part of every limit when processes
    keep their own buckets (``WorkerShare``; by default the whole). ``in_flight_share``: the
    requests a tenant without a ``max_in_flight`` of its own may have in this process at once
    (None: no cap); counted in this process whatever ``store`` is, since what it protects is
    this process's own request slots. ``reserve_completion``: the answer tokens reserved for a
    request that sets no ``max_tokens``. Every method is thread-safe; state lives in ``store``.
    """

    def __init__(self, store: LimitStore | None = None, *,
                 clock: Callable[[], float] = time.monotonic, window: float = 60.0,
                 share: WorkerShare | None = None, in_flight_share: int | None = None,
                 reserve_completion: int = DEFAULT_COMPLETION_RESERVATION):
        if window <= 0:
            raise ValueError("window must be positive")
        self.store = store if store is not None else MemoryLimitStore(sweep_interval=window)
        self.clock = clock
        self.window = window
        self.share = share or WorkerShare()
        self.in_flight_share = in_flight_share or None
        self.reserve_completion = max(0, int(reserve_completion))
        self._slots = MemoryLimitStore()  # the default in-flight shares: this process's own

    def reservation(self, call, count_messages: Callable[[list], int]) -> int:
        """The tokens ``call`` (an ``app.providers.Call``) reserves at admission: its prompt,
        estimated by ``count_messages`` (the condenser's estimate of a chat's messages,
        app/cache/condense.py; each text of a completion's prompt or an embedding's input counts
        as one message, token ids one each), plus the most it may answer:
        ``max_completion_tokens`` or ``max_tokens``, else ``reserve_completion``, for each choice
        asked (``n``, ``best_of``). Embeddings answer no tokens."""
        body = call.body
        if call.endpoint == "chat":
            messages = body.get("messages")
            return (count_messages(messages if isinstance(messages, list) else [])
                    + self._most_answered(body))
        if call.endpoint == "embeddings":
            return _prompt_tokens(body.get("input"), count_messages)
        if call.endpoint in ("messages", "responses"):  # an agent's turn: messages or input
            # items, system, tools: its bytes, four characters a token
            return -(-len(call.raw or b"") // 4) + self._most_answered(body)
        return _prompt_tokens(body.get("prompt"), count_messages) + self._most_answered(body)

    def _most_answered(self, body: dict) -> int:
        most = (_positive(body.get("max_completion_tokens")) or _positive(body.get("max_tokens"))
                or _positive(body.get("max_output_tokens")) or self.reserve_completion)
        return most * max(1, _positive(body.get("n")), _positive(body.get("best_of")))

    def admit(self, tenant: Tenant, tokens: int = 0) -> Admission:
        """Reserve ``tokens`` (the request's ``reservation``), hold an in-flight slot, take one
        request: RateLimited if any says no.

        A refused request costs nothing: the request unit is taken last, and the slot and the
        reservation are given back when a later check refuses. The caller must ``finish()`` the
        admission with the tokens used once the answer (or the stream) has ended.
        """
        tokens_decision = self.check_tokens(tenant, tokens)
        try:
            self.acquire(tenant)
            try:
                requests = self.check_request(tenant)
            except BaseException:
                self.release(tenant)
                raise
        except BaseException:
            self.settle_tokens(tenant, tokens_decision.taken, 0)
            raise
        return Admission(self, tenant, [requests, tokens_decision], tokens_decision.taken)

    def check_request(self, tenant: Tenant) -> Decision:
        """Take one request from the tenant's requests-per-window bucket, or raise RateLimited."""
        return self._check(REQUESTS, tenant, tenant.requests_per_minute, 1)

    def check_tokens(self, tenant: Tenant, reserve: int = 0) -> Decision:
        """Reserve ``reserve`` tokens (at most the whole limit) from the tenant's tokens bucket,
        or raise RateLimited; with nothing to reserve, whether one token is left (takes none)."""
        return self._check(TOKENS, tenant, tenant.tokens_per_minute, reserve)

    def settle_tokens(self, tenant: Tenant, reserved: int, used: int) -> Decision:
        """Settle a reservation to what the answer used: the part not used goes back (never
        past a full bucket), what was used beyond it is charged, and the balance may go below
        zero. Never raises."""
        configured = tenant.tokens_per_minute
        limit = self.share.of(configured) if configured else 0
        if not limit:
            return Decision(TOKENS, True, None)
        return self._take(TOKENS, tenant, limit, cost=max(0, int(used)) - reserved, need=None)

    def charge_tokens(self, tenant: Tenant, tokens: int) -> Decision:
        """Charge what an answer used, with nothing reserved for it. Never raises."""
        return self.settle_tokens(tenant, 0, tokens)

    def acquire(self, tenant: Tenant) -> None:
        """Hold one of the tenant's in-flight slots, or raise RateLimited."""
        configured = tenant.max_in_flight
        if configured is None:  # no limit of its own: the default share of this process's slots
            limit = self.in_flight_share
            if limit and not self._slots.enter(_in_flight(tenant), limit)[0]:
                raise _too_many_in_flight(
                    f"Too many requests in flight for {_who(tenant)}: it may have {limit} of "
                    f"this proxy's request slots at once, the share of a key without a "
                    f"max_in_flight of its own. Retry when one has finished.")
            return
        if not configured:
            return
        limit = self._part(IN_FLIGHT, tenant, configured)
        if not self.store.enter(_in_flight(tenant), limit)[0]:
            raise _too_many_in_flight(
                f"Too many requests in flight for {_who(tenant)}: the limit is {limit}"
                f"{self._split(configured)}. Retry when one has finished.")

    def release(self, tenant: Tenant) -> None:
        """Give back a slot taken by ``acquire``."""
        configured = tenant.max_in_flight
        if configured is None:
            if self.in_flight_share:
                self._slots.leave(_in_flight(tenant))
        elif configured:
            self.store.leave(_in_flight(tenant))

    def _check(self, kind, tenant, configured, cost) -> Decision:
        """One per-window limit: take ``cost`` units (at most the limit) if the bucket holds
        them, and at least one unit, else raise RateLimited naming the limit; a refusal takes
        nothing."""
        if not configured:
            return Decision(kind, True, None)
        limit = self._part(kind, tenant, configured)
        cost = min(max(0, int(cost)), limit)
        decision = self._take(kind, tenant, limit, cost=cost, need=max(1, cost))
        if not decision.allowed:
            raise RateLimited(self._refusal(kind, tenant, limit, configured, cost, decision),
                              headers=decision.headers())
        return decision

    def _refusal(self, kind, tenant, limit, configured, cost, decision) -> str:
        retry = f"Retry in {decision.headers()['Retry-After']} s."
        limit_text = f"{self._describe(kind, limit)}{self._split(configured)}"
        if kind == REQUESTS:
            return f"Rate limit reached for {_who(tenant)}: {limit_text}. {retry}"
        if cost > 1:
            left = max(0, math.floor(decision.remaining))
            return (f"Token limit reached for {_who(tenant)}: {limit_text}. This request "
                    f"reserves {cost} tokens (its prompt, estimated, and the most it may "
                    f"answer: max_tokens) and {left} are left. {retry}")
        return (f"Token limit reached for {_who(tenant)}: {limit_text}, used up by earlier "
                f"answers. {retry}")

    def _part(self, kind, tenant, configured) -> int:
        """This worker's part of a configured limit; RateLimited when that part is none."""
        part = self.share.of(configured)
        if part == 0:
            message = (f"The limit of {_who(tenant)} is {self._describe(kind, configured)} in "
                       f"all, split over {self.share.count} proxy workers that keep their own "
                       f"counts, and this worker's share of it is 0. Retry on a new connection.")
            if kind == IN_FLIGHT:
                raise _too_many_in_flight(message)
            raise RateLimited(message, headers={"Retry-After": "1"})
        return part

    def _split(self, configured) -> str:
        if self.share.count == 1:
            return ""
        return (f" (this worker's share of {configured}: the limit is split over "
                f"{self.share.count} proxy workers)")

    def _describe(self, kind, limit) -> str:
        if kind == IN_FLIGHT:
            return f"{limit} requests in flight"
        return f"{limit} {kind} {self._per()}"

    def _take(self, kind, tenant, limit, *, cost, need) -> Decision:
        took = self.store.take(f"{kind}:{tenant.id}", limit=limit, window=self.window,
                               burst=limit, cost=cost, need=need, now=self.clock())
        return Decision(kind, took.allowed, limit, took.remaining, took.retry_after,
                        took.reset_after, cost if took.allowed else 0)

    def _per(self) -> str:
        return "per minute" if self.window == 60 else f"per {self.window:g} s"


def _positive(value) -> int:
    """A whole number above 0 from the client's body, else 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _prompt_tokens(value, count_messages) -> int:
    """A completion's prompt or an embedding's input: a text, or a list of texts, token ids or
    lists of token ids."""
    items = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    texts = [{"content": item} for item in items if isinstance(item, str)]
    ids = sum(len(item) if isinstance(item, list) else 1
              for item in items if isinstance(item, (int, list)))
    return (count_messages(texts) if texts else 0) + ids


def _in_flight(tenant: Tenant) -> str:
    return f"{IN_FLIGHT}:{tenant.id}"


def _too_many_in_flight(message: str) -> RateLimited:
    return RateLimited(message, code="too_many_concurrent_requests", headers={"Retry-After": "1"})


def _who(tenant: Tenant) -> str:
    return "anonymous clients" if tenant.anonymous else f"API key {tenant.id!r}"
