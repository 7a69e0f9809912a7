"""OpenTelemetry traces: a span per request, its steps and upstream attempts, sent over OTLP.

Off (``observability.traces_endpoint`` empty, the default), ``NullTracing`` stands in: its hooks
do nothing and nothing of OpenTelemetry is imported. On, ``Tracing`` owns a TracerProvider of
its own (never the global one: tests build several apps, and a library that traces on the
global provider does not end up in the proxy's traces), samples new traces at
``traces_sample_ratio`` (a client's sampled parent is always followed), and hands ended spans to
a BatchSpanProcessor whose thread sends them as OTLP/HTTP protobuf; the exporter's standard
variables (``OTEL_EXPORTER_OTLP_HEADERS``, ``..._TIMEOUT``, ``..._COMPRESSION``, certificates)
apply as they do anywhere.

What a trace holds (docs/tracing.md):

    SERVER  "POST /v1/chat/completions"    HTTP conventions, the request id, cache, provider,
      │                                   cost, key id; events: candidates skipped, fallbacks
      ├─ INTERNAL "cache lookup"          hit or miss
      ├─ INTERNAL "condense"              only when a chat was condensed: its summary's calls
      │                                   are its children
      └─ CLIENT "chat gpt-4o"             one per upstream attempt (GenAI conventions); HTTP
                                          retries inside it are its events

What each span says is ``span_attributes``' part. Spans are passed explicitly, never through
contextvars: a stream's generator resumes across ``next()`` calls, where an attached context
would be wrong. The request's span rides on the ``Request`` (app/pipeline), the open attempt's
on the request's ``Attempts``, where the HTTP client finds it and sends its context upstream as
``traceparent`` (``trace_headers``).

Exporting never blocks nor fails a request: a span ends into a bounded queue; when the receiver
is slow or gone and the queue holds ``queue_limit`` spans, new ones are dropped and counted
(``stats()``, and a log line at most once a minute).
"""

from __future__ import annotations

import collections
import logging
import re
import threading
import time

from app.observability.span_attributes import (ANSWER_PARSE_LIMIT, ATTRIBUTE_LIMIT,
                                               answer_attributes, attempt_attributes, cut,
                                               error_type, request_attributes,
                                               server_attributes, server_name, upstream_server)

log = logging.getLogger("llm_proxy.tracing")

QUEUE_LIMIT = 4096  # spans ended and not yet taken by the exporter; past it, spans are dropped
# The BatchSpanProcessor's own bound sits above ours, so it never drops (it would log a
# warning per span): ends racing past our check between two threads stay within it.
QUEUE_SLACK = 1024
FLUSH_TIMEOUT = 5.0  # seconds flush() waits for the queue to be sent
CLOSE_TIMEOUT = 2.0  # seconds close() waits: a dead receiver must not hold a stopping server
DROP_LOG_INTERVAL = 60.0  # seconds between log lines about dropped spans

# What a client sends: anything longer, or malformed, is ignored without a word (the SDK would
# log a warning for each, which a client could repeat on every request).
MAX_TRACEPARENT = 512
MAX_TRACESTATE = 512
MAX_TRACESTATE_MEMBERS = 32
_TRACESTATE_MEMBER = re.compile(
    r"(?:[a-z][_0-9a-z\-*/]{0,255}|[a-z0-9][_0-9a-z\-*/]{0,240}@[a-z][_0-9a-z\-*/]{0,13})"
    r"=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]")


def tracing_for(settings):
    """The tracing ``settings`` (the whole Settings) ask for: ``NULL_TRACING`` when
    ``observability.traces_endpoint`` is empty, else a ``Tracing`` sending to it."""
    observability = settings.observability
    if not observability.traces_endpoint:
        return NULL_TRACING
    return Tracing(observability, version=settings.version)


class NullAttempt:
    """An upstream attempt nobody traces."""
    tail = None  # no stream events kept

    def answered(self, reply) -> None:
        pass

    def streaming(self, first, events, seconds) -> None:
        pass

    def end(self, outcome=None, *, cancelled=False) -> None:
        pass


NULL_ATTEMPT = NullAttempt()


class NullTracing:
    """Tracing off: each hook does nothing and allocates nothing."""
    enabled = False

    def server_span(self, request, request_id):
        return None

    def end_request(self, request, trace, status) -> None:
        pass

    def step(self, parent, name):
        return None

    def end_step(self, span, attributes=None, error=None) -> None:
        pass

    def attempt(self, request, adapter, model, call, attempts, failures=()):
        return NULL_ATTEMPT

    def skipped(self, request, skip) -> None:
        pass

    def stats(self) -> dict:
        return {"enabled": False}

    def flush(self, timeout: float = FLUSH_TIMEOUT) -> bool:
        return True

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        pass


NULL_TRACING = NullTracing()


class Tracing:
    """Tracing on: the hooks the request's path calls, over a TracerProvider of its own."""
    enabled = True

    def __init__(self, settings, *, version: str = "", exporter=None,
                 queue_limit: int = QUEUE_LIMIT, clock=time.monotonic):
        """``settings``: the ``observability`` section. ``exporter``: where spans go (by
        default an OTLPSpanExporter to ``traces_endpoint``)."""
        # Imported here, on the branch that traces: with tracing off none of it is loaded.
        from opentelemetry import trace as trace_api
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import SpanLimits, TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExportResult
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            exporter = OTLPSpanExporter(endpoint=settings.traces_endpoint)
        self.endpoint = settings.traces_endpoint
        self.queue_limit = queue_limit
        self._clock = clock
        self._exporter = _CountingExporter(exporter, SpanExportResult.SUCCESS)
        self._processor = BatchSpanProcessor(self._exporter,
                                             max_queue_size=queue_limit + QUEUE_SLACK)
        self._provider = TracerProvider(
            sampler=ParentBased(TraceIdRatioBased(settings.traces_sample_ratio)),
            resource=Resource.create({"service.name": settings.service_name,
                                      "service.version": version}),
            span_limits=SpanLimits(max_attribute_length=ATTRIBUTE_LIMIT,
                                   max_span_attribute_length=ATTRIBUTE_LIMIT),
            shutdown_on_exit=False)  # close() flushes, within a bound; atexit would wait 30 s
        self._provider.add_span_processor(self._processor)
        self._tracer = self._provider.get_tracer("llm_proxy", version)
        self._propagator = TraceContextTextMapPropagator()
        self._in_context = trace_api.set_span_in_context
        self._server, self._client = trace_api.SpanKind.SERVER, trace_api.SpanKind.CLIENT
        self._error = trace_api.Status(trace_api.StatusCode.ERROR)
        self._lock = threading.Lock()
        self._ended = 0  # recording spans ended into the queue
        self.dropped = 0  # spans dropped at a full queue
        self._drops_logged_at = None
        self._closed = False
        self._servers = {}  # provider name -> its server.address and server.port

    # --- the request ------------------------------------------------------------------------

    def server_span(self, request, request_id: str):
        """The SERVER span of one HTTP request (``request``: Flask's), started now; a child of
        the client's span when it sent a valid W3C ``traceparent``, else a new trace's root.
        Sampled out, it is a non-recording span whose context still goes upstream. None should
        the SDK fail: a trace must never break the request it describes (nor any hook here)."""
        try:
            name, method, route = server_name(request)
            span = self._tracer.start_span(name, context=self._client_context(request.headers),
                                           kind=self._server)
            if span.is_recording():
                span.set_attributes(server_attributes(request, method, route, request_id))
            return span
        except Exception:
            log.debug("request %s: no span", request_id, exc_info=True)
            return None

    def end_request(self, request, trace, status: int) -> None:
        """End ``request.span`` after the answer's last byte: its status and what serving it
        found (``trace``: app.pipeline.Trace)."""
        span = request.span
        if not span.is_recording():
            return
        try:
            span.set_attributes(request_attributes(request, trace, status))
            if status >= 500:  # a server span's 4xx is the client's: no error
                span.set_attribute("error.type", trace.error_code or str(status))
                span.set_status(self._error)
        except Exception:  # a trace must never break the answer it describes
            log.debug("request %s: its span's attributes failed", request.id, exc_info=True)
        self.finish(span)

    def _client_context(self, headers):
        """The client's trace context (W3C ``traceparent`` and ``tracestate``), or None: a
        header that is too long or malformed starts a new trace, silently."""
        parent = headers.get("traceparent")
        if not parent or len(parent) > MAX_TRACEPARENT:
            return None
        carrier = {"traceparent": parent}
        state = headers.get("tracestate")
        if state and _valid_tracestate(state):
            carrier["tracestate"] = state
        return self._propagator.extract(carrier)

    # --- the steps ---------------------------------------------------------------------------

    def step(self, parent, name: str):
        """An INTERNAL span for a step of the request (``parent``: its span), started now; None
        when the request is not traced or was sampled out."""
        if parent is None or not parent.is_recording():
            return None
        try:
            return self._tracer.start_span(name, context=self._in_context(parent))
        except Exception:
            log.debug("no span for %s", name, exc_info=True)
            return None

    def end_step(self, span, attributes=None, error=None) -> None:
        """End a step's span with ``attributes``; ``error``: the exception it failed with."""
        try:
            if attributes:
                span.set_attributes(attributes)
        except Exception:
            log.debug("a step's span attributes failed", exc_info=True)
        self.finish(span, error)

    def skipped(self, request, skip) -> None:
        """A candidate not tried (gateway ``Skipped``): an event on the request's span."""
        span = request.span
        if span is not None and span.is_recording():
            try:
                span.add_event("candidate skipped", {
                    "llm_proxy.provider": skip.provider, "llm_proxy.reason": cut(skip.why),
                    "llm_proxy.rate_limited": skip.rate_limited})
            except Exception:
                log.debug("request %s: no event", request.id, exc_info=True)

    def attempt(self, request, adapter, model: str, call, attempts, failures=()):
        """The attempt about to ask ``adapter`` for ``model``: a CLIENT span under the
        request's span, open on ``attempts.span`` for the HTTP client to send its context
        upstream. ``failures``: the attempts that failed before it (a fallback event names the
        last). Sampled out: the request's span stands on ``attempts`` (its context still goes
        upstream) and nothing is recorded."""
        parent = request.span
        if parent is None:
            return NULL_ATTEMPT
        attempts.span = parent
        if not parent.is_recording():
            return NULL_ATTEMPT
        try:  # the gateway holds the provider's slots here: nothing may raise
            if failures:
                failed = failures[-1]
                parent.add_event("fallback", {
                    "llm_proxy.fallback.from": failed.provider,
                    "llm_proxy.fallback.to": adapter.name, "error.type": error_type(failed),
                    "llm_proxy.reason": cut(failed.message)})
            model = cut(model)  # a client's, through a provider's pattern
            attributes = attempt_attributes(adapter, model, call, self._server_of(adapter))
            span = self._tracer.start_span(f"{attributes['gen_ai.operation.name']} {model}",
                                           context=self._in_context(parent), kind=self._client)
            span.set_attributes(attributes)
        except Exception:
            log.debug("request %s: no span for its attempt", request.id, exc_info=True)
            return NULL_ATTEMPT
        attempts.span = span
        return Attempt(self, span, attempts)

    def _server_of(self, adapter) -> dict:
        """server.address and server.port of ``adapter``'s upstream, worked out once."""
        found = self._servers.get(adapter.name)
        if found is None:
            found = self._servers[adapter.name] = upstream_server(adapter.settings.base_url)
        return found

    # --- export ------------------------------------------------------------------------------

    def finish(self, span, error: BaseException | None = None) -> None:
        """End a recording span into the export queue (failed with ``error``, when given), or
        drop it when the queue is full."""
        try:
            if error is not None:
                span.set_attribute("error.type", error_type(error))
                span.set_status(self._error)
            self._end(span)
        except Exception:
            log.debug("a span did not end", exc_info=True)

    def _end(self, span) -> None:
        with self._lock:
            full = self._ended - self._exporter.taken >= self.queue_limit
            if full:
                self.dropped += 1
            else:
                self._ended += 1
        if full:
            self._note_drop()
            return  # never ended, never exported: freed with the request
        span.end()

    def _note_drop(self) -> None:
        now = self._clock()
        last = self._drops_logged_at
        if last is not None and now - last < DROP_LOG_INTERVAL:
            return
        self._drops_logged_at = now
        log.warning("traces: %d spans waiting for the OTLP receiver at %s: %d spans dropped so "
                    "far (is it down, or slower than the traffic?)", self.queue_limit,
                    self.endpoint, self.dropped)

    def stats(self) -> dict:
        """Spans ended into the queue, waiting in it, sent, failed to send, and dropped."""
        exporter = self._exporter
        return {"enabled": True, "ended": self._ended,
                "queued": max(0, self._ended - exporter.taken), "exported": exporter.sent,
                "failed": exporter.failed, "dropped": self.dropped}

    def flush(self, timeout: float = FLUSH_TIMEOUT) -> bool:
        """Send every ended span now; False when that took longer than ``timeout`` seconds
        (the sending goes on in the background)."""
        return _bounded(self._processor.force_flush, timeout)

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Send what is left and stop, waiting at most ``timeout`` seconds; once."""
        with self._lock:
            closed, self._closed = self._closed, True
        if closed:
            return
        if not _bounded(self._provider.shutdown, timeout):
            log.warning("traces: the OTLP receiver at %s did not take the last spans within "
                        "%g s; they are dropped", self.endpoint, timeout)


class Attempt:
    """One upstream attempt's CLIENT span (the GenAI semantic conventions): open while the
    provider is asked and, for a stream, until its relay ends. Whatever the HTTP client retries
    within it is an event of it: the conventions want one span over the logical call."""

    __slots__ = ("_tracing", "_span", "_attempts", "_first", "_events", "_ended", "tail")

    def __init__(self, tracing, span, attempts):
        self._tracing = tracing
        self._span = span
        self._attempts = attempts
        self._first = self._events = None
        self._ended = False
        self.tail = None  # a stream's last events, kept by the relay for the finish reasons

    def answered(self, reply) -> None:
        """A whole answer came (``Reply``): its usage, response model and finish reasons."""
        body = reply.body
        try:
            self._span.set_attributes(answer_attributes(
                reply.usage, reply.usage_estimated,
                [] if len(body) > ANSWER_PARSE_LIMIT else [body]))
        except Exception:  # a trace must never break the answer it describes
            log.debug("an attempt's span attributes failed", exc_info=True)

    def streaming(self, first, events, seconds: float) -> None:
        """The stream began (``first``: its first event, after ``seconds``): the span stays open
        until the relay ends, keeping the stream's last events (``tail``)."""
        self._first, self._events = first, events
        self.tail = collections.deque(maxlen=3)
        try:
            self._span.set_attribute("gen_ai.response.time_to_first_chunk", seconds)
        except Exception:  # the gateway holds the provider's slots here: nothing may raise
            log.debug("an attempt's span attributes failed", exc_info=True)

    def end(self, outcome=None, *, cancelled=False) -> None:
        """End the span, once: ``outcome`` is the exception the attempt failed with, or
        anything else; ``cancelled``: a stream that ended before its end (the client left)."""
        if self._ended:
            return
        self._ended = True
        if self._attempts.span is self._span:
            self._attempts.span = None
        error = outcome if isinstance(outcome, BaseException) else None
        try:
            if error is None and self._events is not None:
                events = self._events
                self._span.set_attributes(answer_attributes(
                    getattr(events, "usage", None), getattr(events, "usage_estimated", False),
                    [self._first, *self.tail]))
                if cancelled:
                    self._span.set_attribute("llm_proxy.cancelled", True)
        except Exception:  # a trace must never break the answer it describes
            log.debug("an attempt's span attributes failed", exc_info=True)
        self._tracing.finish(self._span, error)


class _CountingExporter:
    """The exporter, counting the spans the batch processor took from its queue (the queue
    then holds the spans ended less those) and those it sent or failed to send."""

    def __init__(self, exporter, success):
        self._exporter = exporter
        self._success = success
        self.taken = self.sent = self.failed = 0  # written by the processor's one thread

    def export(self, spans):
        self.taken += len(spans)
        try:
            result = self._exporter.export(spans)
        except Exception:
            self.failed += len(spans)
            raise
        if result == self._success:
            self.sent += len(spans)
        else:
            self.failed += len(spans)
        return result

    def shutdown(self):
        self._exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._exporter.force_flush(timeout_millis)


# --- what the HTTP client calls ---------------------------------------------------------------

def trace_headers(span) -> dict:
    """The W3C Trace Context naming ``span`` as the parent of an upstream request:
    ``traceparent`` (and ``tracestate`` when the trace carries one); none for an invalid span
    (``OTEL_SDK_DISABLED``)."""
    context = span.get_span_context()
    if not context.is_valid:
        return {}
    headers = {"traceparent": f"00-{context.trace_id:032x}-{context.span_id:016x}-"
                              f"{context.trace_flags:02x}"}
    if context.trace_state:
        headers["tracestate"] = context.trace_state.to_header()
    return headers


def note_retry(span, resend_count: int, why: str, delay: float) -> None:
    """The HTTP client tries ``span``'s attempt again (its ``resend_count``-th resend) after
    ``delay`` seconds, because of ``why`` (a status, or what went wrong)."""
    span.add_event("retry", {"http.request.resend_count": resend_count, "error.type": why,
                             "llm_proxy.retry_delay_s": delay})
    span.set_attribute("http.request.resend_count", resend_count)


def _valid_tracestate(value: str) -> bool:
    """Whether a client's ``tracestate`` is one the SDK takes without a warning: at most
    ``MAX_TRACESTATE`` characters of at most 32 well-formed members."""
    if len(value) > MAX_TRACESTATE:
        return False
    members = [m.strip(" \t") for m in value.split(",")]
    members = [m for m in members if m]
    return (len(members) <= MAX_TRACESTATE_MEMBERS
            and all(_TRACESTATE_MEMBER.fullmatch(m) for m in members))


def _bounded(work, timeout: float) -> bool:
    """Run ``work()`` in a daemon thread; whether it finished within ``timeout`` seconds."""
    def run():
        try:
            work()
        except Exception:
            log.warning("traces: sending the last spans failed", exc_info=True)
    thread = threading.Thread(target=run, name="llm-proxy-traces-flush", daemon=True)
    thread.start()
    thread.join(timeout)
    return not thread.is_alive()
