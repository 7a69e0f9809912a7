"""The request's path, top to bottom, for every entry point.

A view parses its protocol into a ``Call`` and hands it here with the request's context; it
gets back a whole ``Reply`` or an iterable of SSE events, and renders that in its protocol.
The steps, in order:

    admit      the key may use this model (403); its rate limits admit it (429); the tokens
               it spent are charged when the answer ends, a stream's when it is closed
    cache      a fresh cached answer is the answer (HIT); identical requests in flight share
               one upstream call (coalesce); an answer is stored once complete; when every
               provider fails, a stale answer may stand in (app/cache/responses.py)
    condense   an over-long chat is condensed before it is sent (app/cache/condense.py)
    route      the gateway: candidates in order, breakers, bulkheads, retries, fallback
               (app/pipeline/gateway.py)
    re-send    a chat the upstream refused as too long is condensed by force and sent once more
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Callable

from app.errors import UpstreamClientError

if TYPE_CHECKING:  # types only: the pipeline's steps import nothing of each other here
    from app.auth import Tenant
    from app.cache import Entry
    from app.pipeline.limits import Admission


@dataclass
class RequestContext:
    """One client request while it is served: what the view knew when it began (id, clock,
    deadline, the tenant of its key, how to ask whether the client left), and what the steps
    found (the model, the admission, the cache's verdict, the provider that answered, the
    attempts, the time upstream, the usage) for the headers, the access log and the metrics."""
    request_id: str
    started: float
    deadline: float
    client_disconnected: Callable[[], bool] = field(default=lambda: False)
    tenant: Tenant | None = None  # the API key's tenant
    model: str = ""  # the model the client asked for
    admission: Admission | None = None  # its rate-limit admission, settled when the answer ends
    cache: str = ""  # HIT, MISS, BYPASS, STALE (X-Cache)
    cache_age: float | None = None
    cached: Entry | None = None  # the cache entry served
    coalesced: bool = False
    condensed: str = ""  # summary or truncate (X-Proxy-Condensed)
    provider: str = ""
    attempts: int = 0
    upstream_seconds: float = 0.0
    usage: dict | None = None  # the upstream's token counts


class Pipeline:
    """The one sequence every request goes through; each step is a component of its own."""

    def __init__(self, limiter, responses, condensation, gateway):
        self.limiter = limiter  # RateLimiter
        self.responses = responses  # ResponseCache
        self.condensation = condensation  # Condensation
        self.gateway = gateway  # Gateway

    def complete(self, call, ctx, cache_control: str = ""):
        """A whole answer (``Reply``)."""
        try:
            policy = self._admit(call, ctx, cache_control)
            send = partial(self._route, self.gateway.complete, call, ctx)
            return self.responses.complete(call, ctx, policy, send)
        finally:
            _settle(ctx)

    def stream(self, call, ctx, cache_control: str = ""):
        """An iterable of SSE events; it fails before its first event when it fails early."""
        try:
            policy = self._admit(call, ctx, cache_control)
            open_stream = partial(self._route, self.gateway.stream, call, ctx)
            events = self.responses.stream(call, ctx, policy, open_stream)
        except BaseException:
            _settle(ctx)
            raise
        return SettledStream(events, partial(_settle, ctx))

    def _admit(self, call, ctx, cache_control: str):
        """The key's model allow-list and rate limits; the request's cache policy."""
        ctx.model = call.body["model"]
        ctx.tenant.check_model(ctx.model)
        ctx.admission = self.limiter.admit(ctx.tenant)
        return self.responses.policy(ctx.model, cache_control)

    def _route(self, route, call, ctx):
        """Condense, route (``route``: the gateway's complete or stream); condense by force and
        route once more if the upstream refused the chat as too long."""
        call = self.condensation.prepared(call, ctx)
        try:
            return route(call, ctx)
        except UpstreamClientError as e:
            return route(self.condensation.retried(call, ctx, e), ctx)


class SettledStream:
    """A stream's events; once it ends, or is closed (even unstarted), ``settle()`` runs."""

    def __init__(self, events, settle):
        self._events = iter(events)
        self._close = getattr(events, "close", None)
        self._settle = settle

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._events)

    def close(self):
        try:
            if self._close is not None:
                self._close()
        finally:
            self._settle()


def _settle(ctx) -> None:
    """The end of the admit step: charge the tokens the answer used (a cached answer costs
    none) and free the key's in-flight slot. Admission.finish runs once, whoever calls it."""
    if ctx.admission is None:
        return  # refused before admission (403)
    tokens = (ctx.usage or {}).get("total_tokens")
    spent = isinstance(tokens, int) and ctx.cache not in ("HIT", "STALE")
    ctx.admission.finish(tokens if spent else 0)
