"""Per-provider circuit breakers: when to stop sending calls to a failing provider, and when to
try it again.

How pybreaker is used. Each ``ProviderBreaker`` owns a ``pybreaker.CircuitBreaker``, which holds
the state machine's state and counters in its storage (``CircuitMemoryStorage`` by default; a
``CircuitRedisStorage`` can be passed as ``storage=`` to share state between processes). Calls
are never routed through it:

- pybreaker's ``call`` method and its decorator hold the breaker's lock for the whole call, so
  concurrent requests to one provider would run one at a time.
- ``with breaker.calling():`` does release the lock before the block runs, but it still does not
  fit: it lets every caller through in half-open (we bound the trials), times recovery with
  ``datetime.now(UTC)`` (we follow the injected clock), judges the outcome by whether the block
  raised (the gateway judges a response by its status, and a streamed body outlives any block),
  and signals "open" by raising ``CircuitBreakerError``.

So the gateway asks ``allow()`` before a call and reports ``record_success()``,
``record_failure()`` or ``release()`` after it, and this module drives pybreaker's public
transitions (``open()``, ``half_open()``, ``close()``) and storage counters itself, under its own
lock held only for that bookkeeping. Recovery is timed with ``opened_at`` kept in clock units.
The adaptive window, the half-open trial slots and the cool-down are per process.

Provider or model. Behind one URL a provider may serve many models (a LiteLLM or vLLM router,
OpenAI itself), and one model's trouble must not shut off the others. So a failure that
concerns the provider (it could not be reached, the connection broke: ``concerns_provider``)
counts against the provider's breaker, and one that concerns the model asked (a 5xx, a read
timeout, a malformed answer, a 401/403; a 429 cools it down) against a breaker of that
(provider, model), kept by the ``BreakerBoard``; a call must pass both. A 401/403 is the
model's because such an upstream refuses per model (LiteLLM's per-model key access,
OpenRouter's moderation) as often as for a bad key, and a tenant could otherwise shut off
every model by asking for one it may not use; a bad key fails every model, so each opens its
own breaker. A provider that serves a single model has no model breakers: its model's trouble
is the provider's.
"""

from __future__ import annotations

import hashlib
import logging
import sys
import threading
import time
from collections import OrderedDict, deque
from typing import Callable, Iterable, Iterator

from settings import CircuitBreakerSettings


def _import_pybreaker():
    """pybreaker, imported without letting it import redis-py. It imports redis when installed,
    for a Redis storage this proxy does not use (app/state/breakers.py has its own), and
    redis-py 7 brings its asyncio client and OpenTelemetry's metrics along: 8.6 MB of RSS and
    about 0.1 s of start-up for a proxy without Redis. Once redis is imported (``REDIS_URL``
    is set), pybreaker is imported as it is."""
    if "redis" in sys.modules:
        import pybreaker
        return pybreaker
    sys.modules["redis"] = None  # for this import, redis-py is "not installed"
    try:
        import pybreaker
    finally:
        del sys.modules["redis"]
    return pybreaker


pybreaker = _import_pybreaker()

log = logging.getLogger("llm_proxy.breakers")

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"

_FROM_PYBREAKER = {
    pybreaker.STATE_CLOSED: CLOSED,
    pybreaker.STATE_OPEN: OPEN,
    pybreaker.STATE_HALF_OPEN: HALF_OPEN,
}

# What a failure says about the provider as a whole: it could not be reached or the connection
# broke (refused, reset, connect timeout, TLS: app/upstream ``failed_request``), or it
# redirects (misconfigured). Everything else, a 401/403 included, concerns the model asked.
PROVIDER_KINDS = frozenset(("connect", "connection", "redirect"))
MAX_MODEL_NAME = 128  # longer (or unprintable) model names are kept under their hash


def concerns_provider(error) -> bool:
    """Whether an UpstreamError counts against the provider's breaker, not its model's."""
    return error.kind in PROVIDER_KINDS


def model_key(model: str) -> str:
    """The name a model's breaker goes by: the model's own, or, when a client sent a long or
    unprintable one through a pattern, its hash (breakers show in logs and /metrics)."""
    if len(model) <= MAX_MODEL_NAME and model.isprintable():
        return model
    return "sha256:" + hashlib.sha256(model.encode("utf-8", "surrogatepass")).hexdigest()[:32]


class ProviderBreaker:
    """The circuit breaker of one provider, or of one model at a provider (``BreakerBoard.model``).

    States. CLOSED: calls are allowed. It trips to OPEN when the consecutive failures reach the
    current threshold (or, when adaptive, on the failure rate below). OPEN: ``allow()`` is false
    and no connection is attempted, until ``recovery_timeout`` seconds have passed; the first
    ``allow()`` after that moves it to HALF_OPEN. HALF_OPEN: at most ``success_threshold`` trial
    calls are in flight at once (others are refused); ``success_threshold`` successes close it,
    and any failure opens it again for a new recovery period.

    Its numbers come from a ``CircuitBreakerSettings`` (the ``circuit_breaker`` section).

    Adaptive thresholds (``adaptive_thresholds``). The breaker remembers the outcomes of the last
    ``window`` calls. The provider counts as healthy when, leaving out the current run of
    consecutive failures, at least ``min_calls`` outcomes remain and at least 99% of them are
    successes. A healthy provider trips after ``max(min_threshold, failure_threshold // 2)``
    consecutive failures (never more than ``failure_threshold``), so a sudden outage of a
    provider that was fine is noticed fast; otherwise the threshold is ``failure_threshold``.
    Independently, it trips when the window holds at least ``min_calls`` outcomes and at least
    ``failure_rate`` of them are failures, even if successes are interleaved. The window starts
    empty again when the breaker closes after a recovery (and on ``reset()``), so the outage that
    opened it does not count against the provider afterwards. Without adaptive thresholds only the
    consecutive failures count, against ``failure_threshold``.

    Cool-down. ``cool_down(seconds)`` (a 429, or a 503 with Retry-After) makes ``allow()``
    false until then, without changing the state; ``rate_limited=True`` says a rate limit asked
    for it, which ``refusal_at()`` reports (the gateway answers 429 when only rate limits are
    left).

    Every call that ``allow()`` let through must end with exactly one of ``record_success()``,
    ``record_failure()`` or ``release()`` (the call said nothing about the provider, e.g. the
    client went away); in HALF_OPEN that frees its trial slot. A trial that has not reported
    after ``recovery_timeout`` seconds is presumed lost and its slot is freed.

    Listeners are objects with an optional ``state_change(breaker_name, old, new)`` method,
    where the states are "closed", "open" or "half_open". They are called after the breaker's
    lock is released; an exception in one is logged and ignored.
    """

    HEALTHY_SUCCESS_RATE = 0.99

    def __init__(self, name: str, settings: CircuitBreakerSettings | None = None, *,
                 clock: Callable[[], float] = time.monotonic, listeners: Iterable[object] = (),
                 storage: pybreaker.CircuitBreakerStorage | None = None):
        s = settings or CircuitBreakerSettings()
        s.validate(f"circuit breaker {name}")  # SettingsError, a ValueError
        self.name = name
        self.failure_threshold = failure_threshold = s.failure_threshold
        self.recovery_timeout = recovery_timeout = s.recovery_timeout
        self.success_threshold = success_threshold = s.success_threshold
        self.adaptive = s.adaptive_thresholds
        self.min_calls = s.min_calls
        self.failure_rate = s.failure_rate
        self.tight_threshold = min(failure_threshold,
                                   max(s.min_threshold, failure_threshold // 2))
        self._clock = clock
        self._listeners = list(listeners)
        self._storage = storage or pybreaker.CircuitMemoryStorage(pybreaker.STATE_CLOSED)
        self._cb = pybreaker.CircuitBreaker(
            fail_max=failure_threshold, reset_timeout=recovery_timeout,
            success_threshold=success_threshold, state_storage=self._storage, name=name)
        self._lock = threading.Lock()
        self._window: deque[bool] = deque(maxlen=s.window)   # True = success
        self._window_failures = 0
        self._opened_at: float | None = None                # clock time of the last trip
        self._cool_until: float | None = None
        self._cool_rate_limited = False                     # the cool-down is a rate limit's
        self._trials: deque[float] = deque()                # admission times, half-open only

    # -- the gateway's calls ---------------------------------------------------------------

    def allow(self) -> bool:
        """Whether a call may be sent to the provider now; moves OPEN to HALF_OPEN when due."""
        events = []
        with self._lock:
            now = self._clock()
            if self._cool_until is not None and now < self._cool_until:
                return False
            state = self._state(now)
            if state == OPEN:
                if now < self._opened_at + self.recovery_timeout:
                    return False
                self._cb.half_open()
                self._trials.clear()
                events.append((OPEN, HALF_OPEN))
                state = HALF_OPEN
            allowed = True
            if state == HALF_OPEN:
                while self._trials and now - self._trials[0] >= self.recovery_timeout:
                    self._trials.popleft()
                allowed = len(self._trials) < self.success_threshold
                if allowed:
                    self._trials.append(now)
        self._notify(events)
        return allowed

    def record_success(self) -> None:
        """The call succeeded: resets the consecutive failures; in HALF_OPEN, may close."""
        events = []
        with self._lock:
            now = self._clock()
            self._remember(True)
            if self._storage.counter:
                self._storage.reset_counter()
            if self._state(now) == HALF_OPEN:
                if self._trials:
                    self._trials.popleft()
                self._storage.increment_success_counter()
                if self._storage.success_counter >= self.success_threshold:
                    self._cb.close()
                    self._forget()
                    events.append((HALF_OPEN, CLOSED))
        self._notify(events)

    def record_failure(self) -> None:
        """The call failed (the caller decides what counts): may open the circuit."""
        events = []
        with self._lock:
            now = self._clock()
            self._remember(False)
            self._storage.increment_counter()
            state = self._state(now)
            if state == HALF_OPEN or (state == CLOSED and self._should_trip()):
                self._cb.open()
                self._opened_at = now
                self._trials.clear()
                events.append((state, OPEN))
        self._notify(events)

    def release(self) -> None:
        """The call ended without saying anything about the provider: frees a trial slot."""
        with self._lock:
            if self._state(self._clock()) == HALF_OPEN and self._trials:
                self._trials.popleft()

    def cool_down(self, seconds: float, *, rate_limited: bool = False) -> None:
        """Skip the provider for ``seconds`` (e.g. Retry-After on a 429); the state is unchanged.
        ``rate_limited``: a rate limit (HTTP 429) asked for it."""
        if seconds <= 0:
            return
        with self._lock:
            until = self._clock() + seconds
            if self._cool_until is None or until > self._cool_until:
                self._cool_until = until
                self._cool_rate_limited = rate_limited

    def refusal_at(self) -> tuple[str, float, bool]:
        """Why ``allow()`` says no now, in words; the clock time it may say yes (``retry_at``);
        and whether a rate limit's cool-down is all that keeps calls away (not the circuit)."""
        with self._lock:
            now = self._clock()
            state = self._state(now)
            at = self._retry_at(now, state)
            cooling = self._cool_until is not None and now < self._cool_until
            if cooling and state != OPEN:
                if self._cool_rate_limited:
                    return "rate limited (HTTP 429), cooling down", at, True
                return "cooling down (Retry-After)", at, False
            return f"circuit {state}", at, False

    def retry_at(self) -> float:
        """Clock time when the provider can next be tried (now if it can be tried now)."""
        with self._lock:
            now = self._clock()
            return self._retry_at(now, self._state(now))

    def reset(self) -> None:
        """Close the circuit and clear every counter, the window and any cool-down."""
        events = []
        with self._lock:
            old = self._state(self._clock())
            self._cb.close()
            self._storage.reset_counter()
            self._forget()
            self._cool_until = None
            self._cool_rate_limited = False
            if old != CLOSED:
                events.append((old, CLOSED))
        self._notify(events)

    # -- introspection ---------------------------------------------------------------------

    @property
    def state(self) -> str:
        """"closed", "open" or "half_open" (OPEN reads open until ``allow()`` moves it)."""
        with self._lock:
            return self._state(self._clock())

    def snapshot(self) -> dict:
        """The breaker's state and counters, for /debug and /health."""
        with self._lock:
            now = self._clock()
            state = self._state(now)
            failures = self._storage.counter
            calls = len(self._window)
            return {
                "state": state,
                "failures": failures,
                "threshold": self._threshold(failures),
                "success_rate": (calls - self._window_failures) / calls if calls else 1.0,
                "calls_in_window": calls,
                "retry_in": max(0.0, self._retry_at(now, state) - now),
            }

    def add_listener(self, listener: object) -> None:
        """Register an object with an optional ``state_change(name, old, new)`` method."""
        with self._lock:
            self._listeners = [*self._listeners, listener]

    def __repr__(self):
        return f"<ProviderBreaker {self.name!r} {self.state}>"

    # -- bookkeeping, always under self._lock ----------------------------------------------

    def _state(self, now: float) -> str:
        state = _FROM_PYBREAKER[self._storage.state]
        if state == OPEN and self._opened_at is None:
            # Opened by another process through shared storage: recover from when we noticed.
            self._opened_at = now
        return state

    def _remember(self, ok: bool) -> None:
        if len(self._window) == self._window.maxlen and not self._window[0]:
            self._window_failures -= 1
        self._window.append(ok)
        if not ok:
            self._window_failures += 1

    def _forget(self) -> None:
        self._window.clear()
        self._window_failures = 0
        self._trials.clear()
        self._opened_at = None

    def _threshold(self, consecutive: int) -> int:
        if not self.adaptive:
            return self.failure_threshold
        # Health is judged on what came before the current failure run, or the run itself
        # would make the provider look unhealthy and loosen the threshold it should meet.
        before = len(self._window) - min(consecutive, len(self._window))
        successes = len(self._window) - self._window_failures
        if before >= self.min_calls and successes >= self.HEALTHY_SUCCESS_RATE * before:
            return self.tight_threshold
        return self.failure_threshold

    def _should_trip(self) -> bool:
        consecutive = self._storage.counter
        if consecutive >= self._threshold(consecutive):
            return True
        calls = len(self._window)
        return (self.adaptive and calls >= self.min_calls
                and self._window_failures >= self.failure_rate * calls)

    def _retry_at(self, now: float, state: str) -> float:
        at = now
        if state == OPEN:
            at = max(at, self._opened_at + self.recovery_timeout)
        if self._cool_until is not None:
            at = max(at, self._cool_until)
        return at

    def _notify(self, events: list[tuple[str, str]]) -> None:
        for old, new in events:
            log.warning("circuit breaker %s: %s -> %s", self.name, old, new)
            for listener in self._listeners:
                hook = getattr(listener, "state_change", None)
                if hook is None:
                    continue
                try:
                    hook(self.name, old, new)
                except Exception:
                    log.exception("circuit breaker listener %r failed", listener)


class BreakerBoard:
    """One ``ProviderBreaker`` per provider name, all built from one settings section
    (``settings.circuit_breaker``; its defaults when None), and the (provider, model) breakers.

    Model breakers are made on a model's first failure (``model(..., create=True)``): a model
    that never failed costs nothing. With shared storage another process may have opened one,
    so it is made on a model's first call there (its storage writes nothing until it fails).
    Model names come from clients (a provider's pattern takes any), so each provider keeps at
    most ``max_model_breakers`` of them, the least recently used dropped first (with shared
    storage its state stays there, and comes back with the model).

    ``storage_factory(name)``, when given, makes each breaker's pybreaker storage (e.g. a
    ``CircuitRedisStorage`` with one namespace per breaker): ``name`` is the provider's, or
    ``"{provider}/{model}"`` for a model's. Iterating yields the provider breakers.
    """

    def __init__(self, names: Iterable[str], settings: CircuitBreakerSettings | None = None, *,
                 clock: Callable[[], float] = time.monotonic,
                 storage_factory: Callable[[str], pybreaker.CircuitBreakerStorage] | None = None):
        self._settings = settings or CircuitBreakerSettings()
        self._clock = clock
        self._storage_factory = storage_factory
        self.max_models = self._settings.max_model_breakers
        self._breakers: dict[str, ProviderBreaker] = {}
        for name in names:
            if name in self._breakers:
                raise ValueError(f"duplicate provider name {name!r}")
            self._breakers[name] = self._build(name)
        self._models: dict[str, OrderedDict[str, ProviderBreaker]] = {
            name: OrderedDict() for name in self._breakers}
        self._models_lock = threading.Lock()

    def get(self, name: str) -> ProviderBreaker:
        """The breaker of provider ``name``; KeyError if there is none."""
        return self._breakers[name]

    def model(self, provider: str, model: str, *, create: bool = False) -> ProviderBreaker | None:
        """The breaker of ``model`` at ``provider`` (KeyError for an unknown provider): None
        while it has none, unless ``create`` or the storage is shared. Each use makes it the
        most recently used."""
        create = create or self._storage_factory is not None
        key = model_key(model)
        with self._models_lock:
            models = self._models[provider]
            breaker = models.get(key)
            if breaker is not None:
                models.move_to_end(key)
            if breaker is not None or not create:
                return breaker
        made = self._build(f"{provider}/{key}")  # outside the lock: shared storage does I/O
        with self._models_lock:
            models = self._models[provider]
            breaker = models.setdefault(key, made)  # another thread may have made it first
            models.move_to_end(key)
            while len(models) > self.max_models:
                models.popitem(last=False)
        return breaker

    def reset(self, name: str | None = None) -> None:
        """Reset every breaker, or only provider ``name``'s (KeyError if unknown): its own and
        its models'."""
        targets = self._breakers.values() if name is None else [self._breakers[name]]
        for breaker in targets:
            with self._models_lock:
                models = list(self._models[breaker.name].values())
                self._models[breaker.name].clear()
            for model in models:  # reset, not only forgotten: shared storage hears of it
                model.reset()
            breaker.reset()

    def snapshot(self) -> dict[str, dict]:
        """{provider name: that breaker's snapshot()}."""
        return {name: breaker.snapshot() for name, breaker in self._breakers.items()}

    def open_models(self) -> dict[str, dict[str, dict]]:
        """{provider: {model: snapshot()}} of the model breakers that keep calls away now (not
        closed, or cooling down); providers with none are left out."""
        with self._models_lock:
            held = {name: list(models.items()) for name, models in self._models.items()
                    if models}
        found = {}
        for provider, models in held.items():
            for model, breaker in models:
                snap = breaker.snapshot()
                if snap["state"] != CLOSED or snap["retry_in"] > 0:
                    found.setdefault(provider, {})[model] = snap
        return found

    def __iter__(self) -> Iterator[ProviderBreaker]:
        return iter(list(self._breakers.values()))

    def __len__(self) -> int:
        return len(self._breakers)

    def __contains__(self, name: object) -> bool:
        return name in self._breakers

    def _build(self, name: str) -> ProviderBreaker:
        storage = self._storage_factory(name) if self._storage_factory else None
        return ProviderBreaker(name, self._settings, clock=self._clock, storage=storage)
