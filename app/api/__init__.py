"""HTTP surface: the blueprints, the per-request Request and Trace, the one error handler."""

from __future__ import annotations

import logging
import re
import uuid
from dataclasses import replace
from functools import partial

from flask import Response, current_app, g, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from app.auth import presented_key
from app.errors import AuthError, ModelNotFound, PayloadTooLarge, ProxyError, error_body
from app.pipeline import Request, Trace
from settings import ANONYMOUS

log = logging.getLogger("llm_proxy.api")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_QUIET_PATHS = ("/health", "/metrics")  # probes and scrapes: no access log line
_UNTRACED = (*_QUIET_PATHS, "/console")  # nor a span: the console refreshes every few seconds
_PROXIED = ("openai.chat_completions", "openai.completions", "openai.embeddings",
            "anthropic.messages", "responses.create")  # the views that call a provider


def register(app):
    from app.api import (admin, anthropic, health, keys, metrics, openai, providers, responses,
                         usage)

    for module in (openai, anthropic, responses, providers, health, metrics, admin, keys, usage):
        app.register_blueprint(module.bp)
    app.before_request(_start_request)
    app.after_request(_proxy_headers)
    app.register_error_handler(ProxyError, _proxy_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected_error)


def proxy():
    """The LLMProxy that create_app built for this app."""
    return current_app.extensions["llm_proxy"]


def _start_request():
    """``g.request``, the request as every step reads it, and ``g.trace``, what serving it
    found (for the headers below, the metrics and the access log)."""
    llm_proxy = proxy()
    incoming = request.headers.get("X-Request-ID", "")
    started = llm_proxy.clock()
    request_id = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
    tracing = llm_proxy.tracing
    g.request = Request(
        id=request_id,
        started=started,
        deadline=started + llm_proxy.settings.http_client.deadline,
        span=tracing.server_span(request, request_id)
        if tracing.enabled and not request.path.startswith(_UNTRACED) else None)
    disconnected = request.environ.get("waitress.client_disconnected")
    if disconnected is not None:
        g.request = replace(g.request, client_disconnected=disconnected)
    g.trace = Trace()


def _proxy_headers(response):
    req = g.get("request")
    if req is None:
        return response
    trace = g.trace
    llm_proxy = proxy()
    headers = response.headers
    headers["X-Request-ID"] = req.id
    if trace.cache:
        headers["X-Cache"] = trace.cache
        if trace.cache_age is not None:
            headers["Age"] = str(int(trace.cache_age))
    if trace.coalesced:
        headers["X-Proxy-Coalesced"] = "true"
    if trace.condensed:
        headers["X-Proxy-Condensed"] = trace.condensed
    proxied = bool(request.endpoint) and request.endpoint.removesuffix("_unversioned") in _PROXIED
    cost = overhead = None
    if proxied:
        # Every answer to a proxied call, errors and cache hits included: attempts 0 when no
        # upstream was called; no provider header rather than an empty one when none answered
        # (a gateway 502/503/504, a refusal, a stored answer whose provider is not kept).
        overhead = (llm_proxy.clock() - req.started - trace.upstream.seconds) * 1000
        if trace.provider:
            headers["X-Proxy-Provider"] = trace.provider
        headers["X-Proxy-Attempts"] = str(trace.upstream.count)
        headers["X-Proxy-Overhead-Ms"] = f"{overhead:.3f}"
        if not response.is_streamed:  # a stream's usage is known after its headers: _finished
            cost = _price(llm_proxy, trace)
            headers["X-Proxy-Cost-USD"] = f"{cost.usd:.8f}"
    if trace.admission is not None:
        headers.update(trace.admission.headers())
    path = request.path
    if not path.startswith("/metrics"):  # scrapes are not counted
        rule = request.url_rule.rule if request.url_rule is not None else "none"
        response.call_on_close(partial(_finished, llm_proxy, req, trace, request.method, path,
                                       rule, response.status_code, response.is_streamed,
                                       proxied, cost, overhead))
    return response


def _price(llm_proxy, trace):
    """The request's cost at the price table (app/pricing.py): the pipeline's account step
    priced it once its usage was final; a request refused before admission is priced here
    (nothing, or the summary it made)."""
    if trace.cost is None:
        trace.cost = llm_proxy.prices.cost(trace)
    return trace.cost


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def versioned_route(bp, path, **options):
    """Register a view of ``bp`` at ``/v1{path}`` and at ``{path}`` (clients differ on it)."""
    def decorate(view):
        bp.add_url_rule("/v1" + path, view_func=view, **options)
        bp.add_url_rule(path, view_func=view, endpoint=view.__name__ + "_unversioned", **options)
        return view
    return decorate


def answer(call) -> Response:
    """What every front end's view does once it parsed its protocol into ``call``: hand it to
    the pipeline, and render the answer as SSE events or a whole JSON body."""
    pipeline, cache_control = proxy().pipeline, request.headers.get("Cache-Control", "")
    try:
        if call.stream:
            events = pipeline.stream(call, g.request, g.trace, cache_control)
            return Response(events, mimetype="text/event-stream", headers=SSE_HEADERS)
        reply = pipeline.complete(call, g.request, g.trace, cache_control)
    except ModelNotFound as e:
        raise unlisted(e, call.body["model"], g.request.tenant) from None
    finally:
        store = proxy().store
        if store is not None and store.redactor is not None:  # the request log keeps bodies
            g.trace.bodies = (call.raw or request.get_data(), None)
    if g.trace.bodies is not None:
        g.trace.bodies = (g.trace.bodies[0], reply.body)
    return Response(reply.body, status=reply.status, mimetype="application/json")


def unlisted(error, model, tenant):
    """The router's 404 lists every model served: for a key with an allow-list, one that names
    none, so a tenant learns of no model it may not use."""
    if error.code != ModelNotFound.code or not tenant.models:
        return error
    return ModelNotFound(f"The model {model!r} does not exist or is not served by this proxy. "
                         "GET /v1/models lists the models this key may use.", param="model")


def authenticate():
    """Before a client route: the tenant of the request's API key (401 when it has none), and
    the key itself, which no upstream's answer may carry back (app/upstream/secrets.py)."""
    tenant = proxy().keys.authenticate(request.headers)
    g.request = replace(g.request, tenant=tenant, client_key=_client_key(request.headers))


def _client_key(headers) -> str:
    try:
        return presented_key(headers) or ""
    except AuthError:  # malformed: refused above when keys are checked, ignored when not
        return ""


def _finished(llm_proxy, req, trace, method, path, rule, status, streamed, proxied=False,
              cost=None, overhead=None):
    """After the last byte (of a stream too): the request's metrics, access log line, request
    log row and trace span; a proxied stream's cost (``cost`` None: its usage came with its
    last events)."""
    seconds = llm_proxy.clock() - req.started
    llm_proxy.metrics.http_request(method, rule, status, seconds)
    if path.startswith(_QUIET_PATHS):
        return  # probes: counted, not logged
    llm_proxy.metrics.request_done(trace, seconds, streamed)
    if proxied:
        if cost is None:
            cost = _price(llm_proxy, trace)
        key_id = req.tenant.id if req.tenant else ANONYMOUS
        llm_proxy.metrics.answer_cost(key_id, trace, cost)
        llm_proxy.timeline.record(status, seconds, overhead, trace, cost.usd)  # the console's
        if llm_proxy.store is not None:
            llm_proxy.store.record(req, trace, endpoint=rule, status=status, seconds=seconds,
                                   overhead_ms=overhead, streamed=streamed)
    llm_proxy.access_log.record(req, trace, method=method, path=path, status=status,
                                total_ms=seconds * 1000)
    if req.span is not None:  # its trace span ends here, after the last byte
        llm_proxy.tracing.end_request(req, trace, status)


def error_response(error: ProxyError) -> Response:
    trace = g.get("trace")
    if trace is not None:
        trace.error_code = error.code
    response = Response(error.body(), status=error.status, mimetype="application/json")
    response.headers.update(error.headers)
    return response


def _proxy_error(error: ProxyError):
    return error_response(error)


def _http_error(error: HTTPException):
    if isinstance(error, RequestEntityTooLarge):
        limit = current_app.config["MAX_CONTENT_LENGTH"]
        return error_response(PayloadTooLarge(
            f"The request body is larger than the limit of {limit} bytes."))
    messages = {404: f"Unknown path {request.path!r}.",
                405: f"Method {request.method} is not allowed on {request.path!r}."}
    body = error_body(messages.get(error.code, error.description), "invalid_request_error",
                      None, (error.name or "error").lower().replace(" ", "_"))
    response = Response(body, status=error.code, mimetype="application/json")
    if error.code == 405:
        response.headers["Allow"] = ", ".join(error.valid_methods or ())
    return response


def _unexpected_error(error: Exception):
    req = g.get("request")
    log.exception("request %s: unexpected error", req.id if req else "-")
    return Response(error_body("The proxy failed to serve this request.", "server_error", None,
                               "internal_error"), status=500, mimetype="application/json")
