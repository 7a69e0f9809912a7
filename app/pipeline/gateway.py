"""The request pipeline: route a call to its candidate providers, falling back in order.

Each provider is guarded by its circuit breaker and its bulkhead (a limit of calls in
flight); the whole proxy by an admission limit. A provider that is open, cooling down after
a 429 or full is skipped without a connection attempt.
"""

from __future__ import annotations

import collections
import logging
import math
import time

import orjson

from app.errors import (NoProviderAvailable, ProxyError, UpstreamError, UpstreamTimeout,
                        sse_error_event)
from app.observability.metrics import NullMetrics
from app.sse import KEEPALIVE

log = logging.getLogger("llm_proxy.gateway")

SUCCESS, NEUTRAL = "success", "neutral"  # outcomes; a failure is the UpstreamError itself


class Gateway:
    """The one place that decides which provider answers, and what happens when one fails."""

    def __init__(self, router, breakers, bulkheads, admission, *, clock=time.monotonic,
                 metrics=None, keepalive_interval: float = 0.0):
        self.metrics = metrics or NullMetrics()
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
            for adapter, model, retry in self._attempts(call, unavailable):
                outcome, started = NEUTRAL, self.clock()
                try:
                    reply = adapter.send(call, model, request, attempts, retry=retry)
                    outcome = SUCCESS
                    reply.provider = adapter.name
                    return reply
                except UpstreamError as e:
                    outcome = e
                    failures.append(e)
                    log.warning("request %s: %s; trying the next provider", request.id, e.message)
                finally:
                    self._settle(adapter, outcome, self.clock() - started)
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
            adapter, first, events, latency = self._open_stream(call, request, attempts)
        except BaseException:
            self.admission.release()
            raise
        return StreamRelay(first, events, request, adapter.name,
                           lambda outcome: self._end_stream(adapter, outcome, latency),
                           self._orphans, self.clock, self.keepalive_interval)

    def _open_stream(self, call, request, attempts):
        failures, unavailable = [], []
        for adapter, model, retry in self._attempts(call, unavailable):
            events, started = None, self.clock()
            try:
                events = adapter.stream(call, model, request, attempts, retry=retry)
                first = self._first_event(events, started)
            except StopIteration:
                error = UpstreamError(f"provider {adapter.name} sent an empty stream",
                                      provider=adapter.name, kind="truncated")
            except UpstreamError as e:
                error = e
            except BaseException:
                self._settle(adapter, NEUTRAL, self.clock() - started)
                raise
            else:
                return adapter, first, events, self.clock() - started
            if events is not None:
                events.close()
            self._settle(adapter, error, self.clock() - started)
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

    def _attempts(self, call, unavailable):
        """(adapter, model, retry) for the candidates that may be tried now, in order, each
        holding its slots; the ones skipped are noted in ``unavailable``. ``retry``: only the
        last candidate may retry in place (with another left, falling back beats waiting)."""
        candidates = self.router.candidates(call.body["model"], call.endpoint)
        last = candidates[-1][0]
        for adapter, model in candidates:
            if self._acquire(adapter, unavailable):
                yield adapter, model, adapter is last

    def _end_stream(self, adapter, outcome, latency):
        self._settle(adapter, outcome, latency)
        self.admission.release()

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

    def _acquire(self, adapter, unavailable) -> bool:
        """Take a slot in the provider's bulkhead and its breaker's permission, or neither."""
        bulkhead = self.bulkheads[adapter.name]
        if not bulkhead.try_acquire():
            unavailable.append((adapter.name, f"at its limit of {bulkhead.limit} requests in flight",
                                self.clock() + 1.0))
            return False
        breaker = self.breakers.get(adapter.name)
        if not breaker.allow():
            bulkhead.release()
            unavailable.append((adapter.name, f"circuit {breaker.state}", breaker.retry_at()))
            return False
        return True

    def _settle(self, adapter, outcome, seconds):
        """Tell the breaker and the metrics what the call showed; free the provider's slot."""
        self.metrics.upstream_call(adapter.name, seconds, outcome)
        breaker = self.breakers.get(adapter.name)
        if outcome is SUCCESS:
            breaker.record_success()
        elif outcome is NEUTRAL:
            breaker.release()  # a client's 4xx or a disconnect says nothing about the provider
        else:
            breaker.record_failure()
            if outcome.retry_after:
                breaker.cool_down(outcome.retry_after)
        self.bulkheads[adapter.name].release()

    def _exhausted(self, call, failures, unavailable) -> ProxyError:
        model = call.body["model"]
        if not failures:
            wait = min(at for _, _, at in unavailable) - self.clock()
            reasons = "; ".join(f"provider {name}: {why}" for name, why, _ in unavailable)
            return NoProviderAvailable(
                f"No provider is available for {model!r} right now ({reasons}).",
                headers={"Retry-After": str(max(1, math.ceil(wait)))})
        summary = "; ".join(f.message for f in failures)
        summary += "".join(f"; provider {name}: skipped, {why}" for name, why, _ in unavailable)
        timeouts = all(isinstance(f, UpstreamTimeout) for f in failures)
        kind = UpstreamTimeout if timeouts else UpstreamError
        return kind(f"Every provider failed: {summary}", provider=failures[-1].provider)


class StreamRelay:
    """The SSE events of a stream that has begun; ``on_end(outcome)`` runs exactly once.

    A class rather than a bare generator so that ``close()`` settles the provider even when the
    server closes the response before iterating it (an unstarted generator skips its finally).
    Settling takes locks (breaker, bulkhead, metrics), so it never runs from a finalizer: a
    relay dropped without ``close()`` queues its outcome in ``orphans``, which the gateway
    settles on its next request. The event generator holds no reference to the relay, so a
    dropped relay is freed at once, not by the cycle collector in some other code's frame.
    """

    def __init__(self, first, events, request, provider, on_end, orphans, clock=time.monotonic,
                 keepalive_interval=0.0):
        self.provider = provider
        self._on_end = on_end
        self._orphans = orphans
        self._result = [NEUTRAL, None]  # the outcome and the usage, written by the generator
        self._ended = False
        self._gen = _relay_events(first, events, request, provider, self._result, clock,
                                  keepalive_interval)

    @property
    def usage(self) -> dict | None:
        """The upstream's token counts, once its usage chunk went by."""
        return self._result[1]

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


def _relay_events(first, events, request, provider, result, clock, keepalive_interval):
    """Yield the stream's events; ``result[0]`` ends as SUCCESS, NEUTRAL or the UpstreamError,
    ``result[1]`` holds the usage chunk's counts.

    ``KEEPALIVE`` from below means the upstream gave nothing for the client: it goes out only
    when the client has had nothing for ``keepalive_interval`` (0: never).
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
            elif b'"usage":{' in event or b'"usage": {' in event:
                result[1] = _usage(event)
            sent = clock()
            yield event
        result[0] = SUCCESS
    except UpstreamError as e:
        result[0] = e
        log.warning("request %s: stream from %s failed after it began: %s",
                    request.id, provider, e.message)
        yield sse_error_event(e)
    except ProxyError as e:
        yield sse_error_event(e)
    finally:
        events.close()


def _usage(event: bytes):
    """The usage of a stream's usage chunk (sent when the client asked include_usage)."""
    try:
        usage = orjson.loads(event[6:]).get("usage")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return usage if isinstance(usage, dict) else None
