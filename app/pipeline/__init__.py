"""The request's path, top to bottom, for every entry point.

A view parses its protocol into a ``Call`` and hands it here with the ``Request`` (built once,
read by every step) and a fresh ``Trace`` (what serving it found: filled here from what the
steps return, read by the headers, the access log and the metrics). It gets back a whole
``Reply`` or an iterable of SSE events, and renders that in its protocol. The steps, in order:

    admit      the key may use this model (403); its budget has room (429 budget_exceeded),
               reserving the request's estimated cost; its rate limits admit it (429),
               reserving its estimated tokens; settled to the cost and tokens it spent when
               the answer ends (the account step), a stream's when it is closed
    lookup     a fresh cached answer is the answer (HIT); no key, or Cache-Control: no-cache,
               bypasses the cache (app/cache/responses.py)
    coalesce   identical requests in flight share one upstream call
    condense   an over-long chat is condensed before it is sent (app/cache/condense.py)
    route      the gateway: candidates in order, breakers, bulkheads, retries, fallback
               (app/pipeline/gateway.py)
    re-send    a chat the upstream refused as too long is condensed by force and sent once more
    store      a complete answer is stored (a stream's once it ended cleanly)
    stale      when every provider failed, an answer past its TTL may stand in
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING, Callable

from app.cache.responses import BYPASS, HIT, MISS, STALE, PROVIDER_FAILURES
from app.errors import ProxyError, UpstreamClientError
from app.observability.tracing import NULL_TRACING
from app.providers import Reply

if TYPE_CHECKING:  # types only
    from app.auth import Tenant
    from app.cache import Entry
    from app.pipeline.limits import Admission
    from app.pricing import Cost
    from app.store.spend import Hold


def _never_disconnected() -> bool:
    return False


@dataclass(frozen=True)
class Request:
    """One client request as the HTTP surface knows it: built once, read by every step."""
    id: str
    started: float
    deadline: float
    client_disconnected: Callable[[], bool] = _never_disconnected
    tenant: Tenant | None = None  # the API key's tenant (None on routes without a key)
    # The key the client presented ("" for none): scrubbed from upstream text (app/upstream)
    client_key: str = field(default="", repr=False, compare=False)
    # Its trace span (app/observability/tracing.py): the parent of the steps' and attempts'
    # spans; None when tracing is off or the path is a probe. Passed here, not in contextvars:
    # a stream's generator resumes across next() calls.
    span: object = field(default=None, repr=False, compare=False)


class Attempts:
    """The upstream attempts one request made (retries and fallbacks), and the time they took:
    counted by whoever makes them (the HTTP client, the mock provider). ``span``: the trace span
    of the attempt in progress, set by the gateway, whose context the HTTP client sends
    upstream (``traceparent``); None when nothing is traced."""
    __slots__ = ("count", "seconds", "span")

    def __init__(self):
        self.count = 0
        self.seconds = 0.0
        self.span = None

    def record(self, seconds: float = 0.0) -> None:
        self.count += 1
        self.seconds += seconds


@dataclass
class Trace:
    """What serving one request found: the pipeline fills it from what its steps return."""
    model: str = ""  # the model the client asked for
    admission: Admission | None = None  # its rate-limit admission, settled when the answer ends
    cache: str = ""  # HIT, MISS, BYPASS, STALE (X-Cache)
    cache_age: float | None = None
    coalesced: bool = False
    condensed: str = ""  # summary or truncate (X-Proxy-Condensed)
    provider: str = ""  # the provider that answered
    usage: dict | None = None  # the upstream's token counts (OpenAI-shaped)
    usage_estimated: bool = False  # the upstream sent none: the proxy estimated ``usage``
    # (model, usage) of the calls made for this request besides its answer (the summary)
    side_usage: list[tuple[str, dict]] = field(default_factory=list)
    cost: Cost | None = None  # what all that usage costs at the price table
    budget_hold: Hold | None = None  # its reservation against the key's budget
    upstream: Attempts = field(default_factory=Attempts)
    error_code: str | None = None  # the code of the error it was answered with
    bodies: tuple | None = None  # (request, answer) bytes, for a request log that keeps them

    @property
    def cost_usd(self) -> float | None:
        return None if self.cost is None else self.cost.usd

    def tokens(self) -> int:
        """The tokens the upstream calls made for this request used: its answer (none when it
        came from the cache) and the calls beside it (the summary)."""
        answer = self.usage if self.cache not in (HIT, STALE) else None
        total = 0
        for usage in (answer, *(u for _, u in self.side_usage)):
            tokens = (usage or {}).get("total_tokens")
            if isinstance(tokens, int) and tokens > 0:
                total += tokens
        return total

    def served_from_cache(self, status: str, entry: Entry, now: float) -> None:
        self.cache, self.cache_age = status, entry.age(now)


class Pipeline:
    """The one sequence every request goes through; each step is a component of its own."""

    def __init__(self, limiter, responses, condensation, gateway, *, prices, budgets, clock,
                 tracing=NULL_TRACING):
        self.limiter = limiter  # RateLimiter
        self.responses = responses  # ResponseCache
        self.condensation = condensation  # Condensation
        self.gateway = gateway  # Gateway
        self.prices = prices  # PriceTable
        self.budgets = budgets  # SpendLedger (app/store/spend.py)
        self.clock = clock
        self.tracing = tracing  # the steps' spans (app/observability/tracing.py)

    def complete(self, call, request: Request, trace: Trace, cache_control: str = "") -> Reply:
        """A whole answer."""
        try:
            key, policy = self._admit(call, request, trace, cache_control)
            if key is None:
                return self._send(call, request, trace)
            entry = self._lookup(key, policy, request)
            if entry is not None:
                trace.served_from_cache(HIT, entry, self.clock())
                return Reply(entry.value)
            try:
                store = key if policy.write else None
                reply, shared = self.responses.coalesce(
                    key, policy, partial(self._send, call, request, trace, store=store))
            except PROVIDER_FAILURES:
                entry = self.responses.stale(key, policy)
                if entry is None:
                    raise
                trace.served_from_cache(STALE, entry, self.clock())
                return Reply(entry.value)
            if shared:  # another request's answer: it was not ours to charge
                trace.cache, trace.cache_age, trace.coalesced = HIT, 0.0, True
                trace.provider = reply.provider
            return reply
        finally:
            self._settle(trace)

    def stream(self, call, request: Request, trace: Trace, cache_control: str = ""):
        """An iterable of SSE events; it fails before its first event when it fails early."""
        try:
            key, policy = self._admit(call, request, trace, cache_control)
            entry = self._lookup(key, policy, request) if key is not None else None
            if entry is not None:
                trace.served_from_cache(HIT, entry, self.clock())
                events = relay = self.responses.replay(call, entry)
            else:
                try:
                    events = relay = self._route(self.gateway.stream, call, request, trace)
                except PROVIDER_FAILURES:
                    entry = self.responses.stale(key, policy) if key is not None else None
                    if entry is None:
                        raise
                    trace.served_from_cache(STALE, entry, self.clock())
                    events = relay = self.responses.replay(call, entry)
                else:
                    trace.provider = relay.provider
                    if key is not None and policy.write:
                        events = self.responses.recording(call, key, relay)
        except BaseException:
            self._settle(trace)
            raise
        return SettledStream(events, partial(self._settle_stream, trace, relay))

    def _admit(self, call, request, trace, cache_control):
        """The key's model allow-list, budget (the request's estimated cost reserved, when the
        key has a budget) and rate limits (its estimated tokens reserved, when the key has a
        token limit); the request's cache key (None: the cache is bypassed) and policy."""
        trace.model = call.body["model"]
        tenant = request.tenant
        tenant.check_model(trace.model)
        tokens = (self.limiter.reservation(call, self.condensation.condenser.estimate_tokens)
                  if tenant.tokens_per_minute or tenant.budget else 0)
        if tenant.budget is not None:
            trace.budget_hold = self.budgets.hold(tenant,
                                                  self.prices.estimate(trace.model, tokens))
        try:
            trace.admission = self.limiter.admit(tenant,
                                                 tokens if tenant.tokens_per_minute else 0)
        except BaseException:
            if trace.budget_hold is not None:
                self.budgets.release(trace.budget_hold)
            raise
        policy = self.responses.policy(trace.model, cache_control)
        key = self.responses.key_for(call, policy, request)
        trace.cache = BYPASS if key is None or not policy.read else MISS
        return key, policy

    def _lookup(self, key, policy, request):
        """The lookup step: the fresh answer stored under ``key``, or None; a span of its own
        when the request is traced and the cache is read."""
        span = self.tracing.step(request.span, "cache lookup") if policy.read else None
        entry = self.responses.lookup(key, policy)
        if span is not None:
            self.tracing.end_step(span, {"llm_proxy.cache.hit": entry is not None})
        return entry

    def _send(self, call, request, trace, *, store=None) -> Reply:
        """Route a whole answer; keep it under the cache key ``store`` when there is one."""
        reply = self._route(self.gateway.complete, call, request, trace)
        trace.provider, trace.usage = reply.provider, reply.usage
        if store is not None:
            self.responses.store(store, reply)
        return reply

    def _route(self, route, call, request, trace):
        """Condense, route (``route``: the gateway's complete or stream); condense by force and
        route once more if the upstream refused the chat as too long. The summaries made for
        it are charged with it (``side_usage``); a whole answer says whether its usage is an
        estimate (a stream says so when it ends: ``_settle_stream``)."""
        call, trace.condensed, spent = self._condense(self.condensation.prepared, call, request,
                                                      trace)
        trace.side_usage.extend(spent)
        try:
            answer = route(call, request, trace.upstream)
        except UpstreamClientError as e:
            trace.provider = e.provider
            call, trace.condensed, spent = self._condense(self.condensation.retried, call,
                                                          request, trace, e)
            trace.side_usage.extend(spent)
            answer = route(call, request, trace.upstream)
        if isinstance(answer, Reply):
            trace.usage_estimated = answer.usage_estimated
        return answer

    def _condense(self, condense, call, request, trace, *refused):
        """The condense step: ``condense`` (the condensation's ``prepared``, or its ``retried``
        of the chat the upstream ``refused``). When the request is traced, a span of its own,
        the parent of the summary's upstream calls; kept only when the chat was condensed (or
        its summary failed), so a chat under the threshold leaves no trace."""
        span = (self.tracing.step(request.span, "condense")
                if call.endpoint == "chat" and self.condensation.enabled else None)
        if span is None:
            return condense(call, request, trace.upstream, *refused)
        try:
            call, mode, spent = condense(call, replace(request, span=span), trace.upstream,
                                         *refused)
        except ProxyError as e:
            if e not in refused:  # the summary failed (not the refusal, raised as it was)
                self.tracing.end_step(span, error=e)
            raise
        if mode:
            self.tracing.end_step(span, {"llm_proxy.condensed": mode})
        return call, mode, spent

    def _settle_stream(self, trace, relay) -> None:
        """A stream's usage, known once it ended (the relay's: the upstream's, or estimated
        when it sent none; a replay from the cache has none), then the account step."""
        trace.usage = getattr(relay, "usage", None)
        trace.usage_estimated = trace.usage is not None and getattr(relay, "usage_estimated",
                                                                    False)
        self._settle(trace)

    def _settle(self, trace) -> None:
        """The account step, the end of the admit step: what the request's calls cost at the
        price table; the budget's reservation settled to it; the tokens reserved settled to
        those the answer used (a cached answer costs none: its reservation goes back) and the
        key's in-flight slot freed. Admission.finish runs once, whoever calls it."""
        if trace.admission is None:
            return  # refused before admission (403, 429)
        cost = trace.cost = self.prices.cost(trace)
        hold = trace.budget_hold
        if hold is not None and not hold.day:
            self.budgets.settle(hold, trace.admission.tenant, cost.usd)
        trace.admission.finish(trace.tokens())


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
