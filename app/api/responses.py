"""The OpenAI Responses endpoints (``/v1/responses``, also without ``/v1``): create through
the pipeline like any call; retrieve and cancel forwarded to the provider that keeps it."""

from __future__ import annotations

import re
from functools import partial
from urllib.parse import urlencode

from flask import Blueprint, Response, g, request

from app.api import answer, authenticate, proxy, versioned_route
from app.errors import InvalidRequest, NotFound
from app.pipeline import Attempts
from app.protocols.responses import dropped_tools, validate_request
from app.providers import Call
from app.validation import parse_body

bp = Blueprint("responses", __name__)
bp.before_request(authenticate)
# The client headers a native provider gets as sent (never its key: the provider's own is used).
FORWARDED = ("OpenAI-Beta",)
_RESPONSE_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,256}$")
QUERY = ("include", "include[]")  # the query a retrieve forwards (what to include)


_route = partial(versioned_route, bp)


@_route("/responses", methods=["POST"])
def create():
    """A response from the model's providers: passed through to one that speaks Responses,
    translated to Chat Completions for the others (app/protocols/responses.py)."""
    raw = request.get_data(cache=False)
    body = validate_request(parse_body(raw))
    stream = body.get("stream") is True
    headers = {name: request.headers[name] for name in FORWARDED if name in request.headers}
    call = Call("responses", body, raw, stream, headers)
    response = answer(call)
    dropped = _dropped(body, g.trace.provider)
    if dropped:
        response.headers["X-Proxy-Dropped-Tools"] = ", ".join(dropped)
    return response


@_route("/responses/<response_id>", methods=["GET"])
def retrieve(response_id):
    if request.args.get("stream") in ("true", "1"):
        raise InvalidRequest("Resuming a response's stream is not served through this proxy; "
                             "GET it without 'stream'.", param="stream",
                             code="unsupported_parameter")
    return _stored(response_id, cancel=False)


@_route("/responses/<response_id>/cancel", methods=["POST"])
def cancel(response_id):
    return _stored(response_id, cancel=True)


def _stored(response_id: str, *, cancel: bool):
    """The answer of the provider that keeps ``response_id``, made through this proxy for this
    key (404 for any other id: whether another key's exists is not this key's business)."""
    tenant = g.request.tenant.id
    for adapter in proxy().providers if _RESPONSE_ID.match(response_id) else ():
        stored = getattr(adapter, "stored_responses", None)  # pass-through providers only
        if stored is not None and stored.owned_by(response_id, tenant):
            query = urlencode([(name, value) for name, value in request.args.items(multi=True)
                               if name in QUERY])
            reply = adapter.stored_response(response_id, g.request, Attempts(), cancel=cancel,
                                            query=query)
            return Response(reply.body, status=reply.status, mimetype="application/json")
    raise NotFound(f"No response {response_id!r} made through this proxy is kept by a provider "
                   "(responses translated to Chat Completions are not kept).",
                   param="response_id")


def _dropped(body: dict, provider: str) -> list[str]:
    """The tools left out of a call its provider answered translated (none for one that
    speaks Responses natively, or an answer from the cache)."""
    if not provider or not body.get("tools"):
        return []
    adapter = next((a for a in proxy().providers if a.name == provider), None)
    if adapter is None or "responses" in adapter.endpoints:
        return []
    return dropped_tools(body)
