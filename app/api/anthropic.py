"""The Anthropic endpoints: ``POST /v1/messages`` (Claude Code, the anthropic SDK) and its
``count_tokens``, every error in Anthropic's envelope (app/protocols/messages.py says how)."""

from __future__ import annotations

import logging

from flask import Blueprint, Response, current_app, g, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from app.api import answer, authenticate, proxy, unlisted
from app.errors import ModelNotFound, NotFound, PayloadTooLarge, ProxyError
from app.protocols import messages as protocol
from app.providers import Call
from app.validation import parse_body

log = logging.getLogger("llm_proxy.api")
bp = Blueprint("anthropic", __name__)


@bp.before_request
def _authenticate():
    if request.endpoint != "anthropic.probe":  # the probe is answered to anyone
        authenticate()


@bp.route("/", methods=["HEAD"])
def probe():
    """An older Claude Code sends ``HEAD /`` before its first call: the proxy is there."""
    return Response(status=200)


@bp.route("/v1/messages", methods=["POST"])
def messages():
    """A Message, whole or as Anthropic's SSE events, from whichever provider serves the model:
    natively (Anthropic) or translated (any Chat Completions provider). Claude Code's
    ``?beta=true`` changes nothing: its betas are in ``anthropic-beta``, which is forwarded."""
    raw = request.get_data(cache=False)
    body = protocol.validate(parse_body(raw))
    stream = body.get("stream") is True
    call = Call("messages", body, raw, stream, protocol.protocol_headers(request.headers))
    return answer(call)


@bp.route("/v1/messages/count_tokens", methods=["POST"])
def count_tokens():
    """``{"input_tokens": n}``: the Anthropic upstream's count, else the proxy's estimate
    (``protocol.count_tokens``). It calls no model: the key's model list and its request
    limits apply, and it spends none of the key's tokens."""
    raw = request.get_data(cache=False)
    body = protocol.validate(parse_body(raw), count=True)
    call = Call("messages", body, raw, False, protocol.protocol_headers(request.headers))
    llm_proxy, tenant, trace = proxy(), g.request.tenant, g.trace
    trace.model = body["model"]
    tenant.check_model(trace.model)
    trace.admission = llm_proxy.limiter.admit(tenant)
    try:
        counted = protocol.count_tokens(llm_proxy.router, call, g.request, trace.upstream)
    except ModelNotFound as e:
        raise unlisted(e, body["model"], tenant) from None
    finally:
        trace.admission.finish(0)
    return Response(counted, mimetype="application/json")


@bp.route("/v1/messages", methods=["GET", "PUT", "PATCH", "DELETE"])
@bp.route("/v1/messages/count_tokens", methods=["GET", "PUT", "PATCH", "DELETE"])
def wrong_method():
    """A 405 in Anthropic's envelope (the app's own would be OpenAI's)."""
    raise ProxyError(f"Method {request.method} is not allowed on {request.path!r}.", status=405,
                     code="method_not_allowed", headers={"Allow": "POST"})


@bp.route("/v1/messages/<path:rest>", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
def unknown(rest):
    """Anthropic's other message routes (batches...) are not served: a 404 in its envelope."""
    raise NotFound(f"Unknown path {request.path!r}.")


@bp.errorhandler(ProxyError)
def _proxy_error(error: ProxyError):
    return error_response(error)


@bp.errorhandler(HTTPException)
def _http_error(error: HTTPException):
    if isinstance(error, RequestEntityTooLarge):
        limit = current_app.config["MAX_CONTENT_LENGTH"]
        return error_response(PayloadTooLarge(
            f"The request body is larger than the limit of {limit} bytes."))
    return error_response(ProxyError(error.description or error.name, status=error.code or 500))


@bp.errorhandler(Exception)
def _unexpected_error(error: Exception):
    req = g.get("request")
    log.exception("request %s: unexpected error", req.id if req else "-")
    return error_response(ProxyError("The proxy failed to serve this request."))


def error_response(error: ProxyError) -> Response:
    """``{"type": "error", "error": {"type", "message"}, "request_id"}`` with Anthropic's
    status (app/protocols/messages.py ``error_status``) and the error's headers."""
    req = g.get("request")
    response = Response(protocol.error_body(error, req.id if req else None),
                        status=protocol.error_status(error), mimetype="application/json")
    response.headers.update(error.headers)
    return response
