"""The request pipeline: route a call to its candidate providers, falling back in order.

Each provider is guarded by its circuit breaker and its bulkhead (a limit of calls in
flight), each model of a provider that serves several by a breaker of its own; the whole proxy
by an admission limit. A provider or model that is open, cooling down after a 429 or full is
skipped without a connection attempt.

When every candidate failed, the answer says how: 429 ``upstream_rate_limited`` when they were
all rate limits (an upstream 429, or a cool-down after one), with the shortest Retry-After, so
a client can tell a rate limit from an outage; otherwise 502, 504 when all timed out, or 503
when none could be tried: ``provider_full`` when every one was only at its limit of calls in
flight (healthy, and free again as soon as a call ends), ``no_provider_available`` otherwise.
"""

from __future__ import annotations

import collections
import logging
import math
import time

from app.errors import (NoProviderAvailable, ProviderFull, ProxyError, UpstreamError,
                        UpstreamRateLimited, UpstreamTimeout)
from app import protocols
from app.observability.metrics import NullMetrics
from app.observability.tracing import NULL_TRACING
from app.pipeline.breakers import concerns_provider
from app.sse import KEEPALIVE

log = logging.getLogger("llm_proxy.gateway")

SUCCESS, NEUTRAL = "success", "neutral"  # outcomes; a failure is the UpstreamError itself
RATE_LIMITED = 429
# A 429 without Retry-After: how long its provider (or model) is left alone. Short, since
# nothing says how long the limit lasts; long enough that the next requests go elsewhere.
RATE_LIMIT_COOL_DOWN = 1.0


class Skipped(collections.namedtuple("Skipped", "provider why retry_at rate_limited full",
                                     defaults=(False,))):
    """A candidate not tried: why, when it may be tried again, and whether a rate limit's
    cool-down, or its bulkhead being full, is all that kept it away."""


class Gateway:
    """The one place that decides which provider answers, and what happens when one fails."""

    def __init__(self, router, breakers, bulkheads, admission, *, clock=time.monotonic,
                 metrics=None, keepalive_interval: float = 0.0, tracing=NULL_TRACING):
        self.metrics = metrics or NullMetrics()
        # Each attempt's span, and the skips and fallbacks as events of the request's span.
        self.tracing = tracing
        self.keepalive_interval = keepalive_interval  # seconds of quiet before ": keepalive"
        self.router = router
        self.breakers = breakers  # BreakerBoard
        self.bulkheads = bulkheads  # provider name -> Bulkhead
        self.admission = admission  # Bulkhead for the whole proxy
        self.clock = clock
        self._orphans = collections.deque()  # (on_end, outcome) of streams dropped unclosed

    def complete(self, call, request, attempts):
        """A whole answer from the first candidate that gives one (``Reply.provider`` names it);
        every upstream attempt counts in ``attempts``."""
        self._admit_request()
        try:
            failures, unavailable = [], []
            for adapter, model, retry in self._attempts(call, unavailable, request):
                outcome, started = NEUTRAL, self.clock()
                attempt = self.tracing.attempt(request, adapter, model, call, attempts, failures)
                try:
                    reply = protocols.send(adapter, call, model, request, attempts, retry=retry)
                    outcome = SUCCESS
                    reply.provider = adapter.name
                    attempt.answered(reply)
                    return reply
                except UpstreamError as e:
                    outcome = e
                    failures.append(e)
                    log.warning("request %s: %s; trying the next provider", request.id, e.message)
                except BaseException as e:  # the client's own 4xx, a disconnect: traced as such
                    attempt.end(e)
                    raise
                finally:
                    self._settle(adapter, model, outcome, self.clock() - started)
                    attempt.end(outcome)
            raise self._exhausted(call, failures, unavailable)
        finally:
            self.admission.release()

    def stream(self, call, request, attempts):
        """An iterable of SSE events from the first candidate whose stream starts.

        Failures before the first event fall back to the next provider; after it, the stream
        ends with an SSE error event. The provider's slot and the request's admission are held
        until the stream ends or the client goes away. The relay names its ``provider`` and,
        once the upstream sent it, its ``usage``.
        """
        self._admit_request()
        try:
            adapter, model, first, events, latency, attempt = self._open_stream(call, request,
                                                                                attempts)
        except BaseException:
            self.admission.release()
            raise
        return StreamRelay(first, events, request, adapter.name, call.endpoint,
                           lambda outcome: self._end_stream(adapter, model, outcome, latency,
                                                            attempt),
                           self._orphans, self.clock, self.keepalive_interval, attempt.tail)

    def _open_stream(self, call, request, attempts):
        failures, unavailable = [], []
        for adapter, model, retry in self._attempts(call, unavailable, request):
            events, started = None, self.clock()
            attempt = self.tracing.attempt(request, adapter, model, call, attempts, failures)
            try:
                events = protocols.stream(adapter, call, model, request, attempts, retry=retry)
                first = self._first_event(events, started)
            except StopIteration:
                error = UpstreamError(f"provider {adapter.name} sent an empty stream",
                                      provider=adapter.name, kind="truncated")
            except UpstreamError as e:
                error = e
            except BaseException as e:
                self._settle(adapter, model, NEUTRAL, self.clock() - started)
                attempt.end(e)
                raise
            else:
                latency = self.clock() - started
                attempt.streaming(first, events, latency)  # its span ends with the relay
                return adapter, model, first, events, latency, attempt
            if events is not None:
                events.close()
            self._settle(adapter, model, error, self.clock() - started)
            attempt.end(error)
            failures.append(error)
            log.warning("request %s: %s; trying the next provider", request.id, error.message)
        raise self._exhausted(call, failures, unavailable)

    def _first_event(self, events, started):
        """The stream's first event. Quiet before it is waited out until the client has waited
        ``keepalive_interval``; then a keep-alive is the first event, and the stream is
        committed to this provider (a later failure ends it with an error event)."""
        event = next(events)
        while event is KEEPALIVE and not (
                self.keepalive_interval and self.clock() - started >= self.keepalive_interval):
            event = next(events)
        return event

    def _attempts(self, call, unavailable, request):
        """(adapter, model, retry) for the candidates that may be tried now, in order, each
        holding its slots; the ones skipped are noted in ``unavailable`` (and as events of the
        request's span). ``retry``: only the last candidate may retry in place (with another
        left, falling back beats waiting)."""
        candidates = self.router.candidates(call.body["model"], call.endpoint)
        last = candidates[-1][0]
        for adapter, model in candidates:
            if self._acquire(adapter, model, unavailable):
                yield adapter, model, adapter is last
            else:
                self.tracing.skipped(request, unavailable[-1])

    def _end_stream(self, adapter, model, outcome, latency, attempt):
        self._settle(adapter, model, outcome, latency)
        self.admission.release()
        attempt.end(outcome, cancelled=outcome is NEUTRAL)

    def _admit_request(self):
        while self._orphans:
            try:
                on_end, outcome = self._orphans.popleft()
            except IndexError:  # another thread took the last one
                break
            on_end(outcome)
        if not self.admission.try_acquire():
            raise NoProviderAvailable(
                f"The proxy is serving its limit of {self.admission.limit} requests; retry shortly.",
                code="proxy_overloaded", headers={"Retry-After": "1"})

    def _acquire(self, adapter, model, unavailable) -> bool:
        """Take a slot in the provider's bulkhead and its breakers' permission (the provider's,
        then the model's), or none of them."""
        bulkhead = self.bulkheads[adapter.name]
        if not bulkhead.try_acquire():
            unavailable.append(Skipped(
                adapter.name, f"at its limit of {bulkhead.limit} requests in flight",
                self.clock() + 1.0, False, full=True))
            return False
        provider = self.breakers.get(adapter.name)
        if not provider.allow():
            bulkhead.release()
            unavailable.append(Skipped(adapter.name, *provider.refusal_at()))
            return False
        breaker = self._model_breaker(adapter, model)
        if breaker is not None and not breaker.allow():
            provider.release()
            bulkhead.release()
            why, retry_at, rate_limited = breaker.refusal_at()
            unavailable.append(Skipped(adapter.name, f"model {model}: {why}", retry_at,
                                       rate_limited))
            return False
        return True

    def _model_breaker(self, adapter, model, *, create=False):
        """The breaker of ``model`` at ``adapter``'s provider; None when it has none (yet), or
        when the provider serves one model (its breaker is the provider's)."""
        if not self.router.serves_several_models(adapter.name):
            return None
        return self.breakers.model(adapter.name, model, create=create)

    def _settle(self, adapter, model, outcome, seconds):
        """Tell the breakers and the metrics what the call showed; free the provider's slot.

        A failure counts against the provider's breaker when it concerns the provider (it could
        not be reached, refused our key), else against the model's; the other breaker hears the
        call said nothing about it. A 429 is a rate limit, not a fault: it cools the provider or
        model down (for its Retry-After) without counting towards opening the circuit."""
        self.metrics.upstream_call(adapter.name, seconds, outcome)
        provider = self.breakers.get(adapter.name)
        if outcome is SUCCESS or outcome is NEUTRAL:
            breaker = self._model_breaker(adapter, model)
            for target in (provider, breaker) if breaker is not None else (provider,):
                if outcome is SUCCESS:
                    target.record_success()
                else:
                    target.release()  # a client's 4xx or a disconnect says nothing of either
        else:
            several = self.router.serves_several_models(adapter.name)
            if concerns_provider(outcome) or not several:
                target, other = provider, self._model_breaker(adapter, model)
            else:
                target, other = self._model_breaker(adapter, model, create=True), provider
            if outcome.upstream_status == RATE_LIMITED:
                target.release()
                target.cool_down(outcome.retry_after or RATE_LIMIT_COOL_DOWN, rate_limited=True)
            else:
                target.record_failure()
                if outcome.retry_after:
                    target.cool_down(outcome.retry_after)
            if other is not None:
                other.release()
        self.bulkheads[adapter.name].release()

    def _exhausted(self, call, failures, unavailable) -> ProxyError:
        model = call.body["model"]
        limited = self._rate_limited(model, failures, unavailable)
        if limited is not None:
            return limited
        if not failures:
            wait = min(skip.retry_at for skip in unavailable) - self.clock()
            reasons = "; ".join(f"provider {skip.provider}: {skip.why}" for skip in unavailable)
            if all(skip.full for skip in unavailable):  # healthy, busy: not absent
                return ProviderFull(
                    f"Every provider of {model!r} is serving its limit of requests in flight "
                    f"({reasons}); retry shortly, or raise THREADS or "
                    "routing.provider_max_in_flight.", headers={"Retry-After": "1"})
            return NoProviderAvailable(
                f"No provider is available for {model!r} right now ({reasons}).",
                headers={"Retry-After": str(max(1, math.ceil(wait)))})
        summary = "; ".join(f.message for f in failures)
        summary += "".join(f"; provider {skip.provider}: skipped, {skip.why}"
                           for skip in unavailable)
        timeouts = all(isinstance(f, UpstreamTimeout) for f in failures)
        kind = UpstreamTimeout if timeouts else UpstreamError
        return kind(f"Every provider failed: {summary}", provider=failures[-1].provider)

    def _rate_limited(self, model, failures, unavailable) -> UpstreamRateLimited | None:
        """The 429 to answer when every candidate was rate limited (it answered 429, or was
        skipped cooling down after one), with the shortest wait any of them asked; else None."""
        if not (failures or unavailable):
            return None
        if not all(f.upstream_status == RATE_LIMITED for f in failures):
            return None
        if not all(skip.rate_limited for skip in unavailable):
            return None
        now = self.clock()
        waits = [f.retry_after if f.retry_after is not None else RATE_LIMIT_COOL_DOWN
                 for f in failures]
        waits += [skip.retry_at - now for skip in unavailable]
        wait = max(1, math.ceil(min(waits)))
        names = [f.provider for f in failures] + [skip.provider for skip in unavailable]
        return UpstreamRateLimited(
            f"Every provider of {model!r} is rate limiting it ({', '.join(names)}); retry "
            f"after {wait} s.", provider=failures[-1].provider if failures else "",
            upstream_status=RATE_LIMITED, kind="status", retry_after=float(wait),
            headers={"Retry-After": str(wait)})


class StreamRelay:
    """The SSE events of a stream that has begun; ``on_end(outcome)`` runs exactly once.

    A class rather than a bare generator so that ``close()`` settles the provider even when the
    server closes the response before iterating it (an unstarted generator skips its finally).
    Settling takes locks (breaker, bulkhead, metrics), so it never runs from a finalizer: a
    relay dropped without ``close()`` queues its outcome in ``orphans``, which the gateway
    settles on its next request. The event generator holds no reference to the relay, so a
    dropped relay is freed at once, not by the cycle collector in some other code's frame.
    """

    def __init__(self, first, events, request, provider, endpoint, on_end, orphans,
                 clock=time.monotonic, keepalive_interval=0.0, tail=None):
        self.provider = provider
        self._on_end = on_end
        self._orphans = orphans
        self._events = events  # the adapter's ProviderStream: the usage travels beside it
        self._result = [NEUTRAL]  # the outcome, written by the generator
        self._ended = False
        # ``tail``: where the relay keeps the last events, for a traced attempt's span
        self._gen = _relay_events(first, events, request, provider, endpoint, self._result,
                                  clock, keepalive_interval, tail)

    @property
    def usage(self) -> dict | None:
        """The answer's token counts, OpenAI-shaped, once the stream ended: the upstream's,
        whether or not the client asked for a usage chunk, or the adapter's estimate."""
        return getattr(self._events, "usage", None)

    @property
    def usage_estimated(self) -> bool:
        """Whether ``usage`` is an estimate: the upstream sent no final count."""
        return bool(getattr(self._events, "usage_estimated", False))

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self._gen)
        except StopIteration:
            self._end()
            raise

    def close(self):
        self._gen.close()
        self._end()

    def __del__(self):
        if not self._ended:
            self._ended = True
            self._orphans.append((self._on_end, self._result[0]))  # deque.append takes no lock

    def _end(self):
        if not self._ended:
            self._ended = True
            self._on_end(self._result[0])


def _relay_events(first, events, request, provider, endpoint, result, clock, keepalive_interval,
                  tail=None):
    """Yield the stream's events; ``result[0]`` ends as SUCCESS, NEUTRAL or the UpstreamError;
    a failure ends the stream with the error event of ``endpoint``'s protocol.

    ``KEEPALIVE`` from below means the upstream gave nothing for the client: it goes out only
    when the client has had nothing for ``keepalive_interval`` (0: never). ``tail`` (a bounded
    deque, or None): where each event relayed is kept, for a traced attempt's finish reasons.
    """
    try:
        yield first
        sent = clock()
        for event in events:
            if request.client_disconnected():
                return  # the finally closes the upstream connection
            if event is KEEPALIVE:
                if not keepalive_interval or clock() - sent < keepalive_interval:
                    continue
            sent = clock()
            if tail is not None and event is not KEEPALIVE:
                tail.append(event)
            yield event
        result[0] = SUCCESS
    except UpstreamError as e:
        result[0] = e
        log.warning("request %s: stream from %s failed after it began: %s",
                    request.id, provider, e.message)
        yield protocols.error_event(endpoint, e)
    except ProxyError as e:
        yield protocols.error_event(endpoint, e)
    finally:
        events.close()
