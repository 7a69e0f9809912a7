"""The request pipeline: route a call to its candidate providers, falling back in order."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from app.errors import (NoProviderAvailable, ProxyError, UpstreamClientError, UpstreamError,
                        UpstreamTimeout, sse_error_event)

log = logging.getLogger("llm_proxy.gateway")


@dataclass
class RequestContext:
    """What the proxy knows about one client request while it is served."""
    request_id: str
    started: float
    deadline: float
    attempts: int = 0
    upstream_seconds: float = 0.0
    provider: str = ""
    client_disconnected: object = field(default=lambda: False)


class Gateway:
    """The one place that decides which provider answers, and what happens when one fails."""

    def __init__(self, router, *, clock=time.monotonic):
        self.router = router
        self.clock = clock

    def complete(self, call, ctx):
        """A whole answer from the first candidate that gives one."""
        failures = []
        for adapter, model in self.router.candidates(call.body["model"], call.endpoint):
            try:
                reply = adapter.send(call, model, ctx)
            except UpstreamClientError as e:
                ctx.provider = adapter.name
                raise e
            except UpstreamError as e:
                failures.append(e)
                log.warning("request %s: %s; trying the next provider", ctx.request_id, e.message)
                continue
            ctx.provider = adapter.name
            return reply
        raise self._exhausted(call, failures)

    def stream(self, call, ctx):
        """An iterator of SSE events from the first candidate whose stream starts.

        Failures before the first event fall back to the next provider; after it, the stream
        ends with an SSE error event.
        """
        failures = []
        for adapter, model in self.router.candidates(call.body["model"], call.endpoint):
            events = None
            try:
                events = adapter.stream(call, model, ctx)
                first = next(events)
            except UpstreamClientError as e:
                ctx.provider = adapter.name
                raise e
            except (UpstreamError, StopIteration) as e:
                if events is not None:
                    events.close()
                if isinstance(e, StopIteration):
                    e = UpstreamError(f"provider {adapter.name} sent an empty stream",
                                      provider=adapter.name, kind="truncated")
                failures.append(e)
                log.warning("request %s: %s; trying the next provider", ctx.request_id, e.message)
                continue
            ctx.provider = adapter.name
            return self._relay(first, events, ctx)
        raise self._exhausted(call, failures)

    def _relay(self, first, events, ctx):
        try:
            yield first
            for event in events:
                if ctx.client_disconnected():
                    return  # finally closes the upstream connection
                yield event
        except ProxyError as e:
            log.warning("request %s: stream from %s failed after it began: %s",
                        ctx.request_id, ctx.provider, e.message)
            yield sse_error_event(e)
        finally:
            events.close()

    @staticmethod
    def _exhausted(call, failures) -> ProxyError:
        if not failures:
            return NoProviderAvailable(f"No provider is available for {call.body['model']!r}.")
        summary = "; ".join(f.message for f in failures)
        kind = UpstreamTimeout if all(isinstance(f, UpstreamTimeout) for f in failures) else UpstreamError
        error = kind(f"Every provider failed: {summary}", provider=failures[-1].provider)
        return error
