"""The OpenAI endpoints, each also reachable without the ``/v1`` prefix."""

from __future__ import annotations

from datetime import datetime, timezone
from functools import partial

import orjson
from flask import Blueprint, Response, g, request

from app.api import answer, authenticate, proxy, versioned_route
from app.errors import ModelNotFound
from app.providers import Call
from app.validation import parse_body, validate

bp = Blueprint("openai", __name__)
bp.before_request(authenticate)
_route = partial(versioned_route, bp)


@_route("/chat/completions", methods=["POST"])
def chat_completions():
    return _serve("chat")


@_route("/completions", methods=["POST"])
def completions():
    return _serve("completions")


@_route("/embeddings", methods=["POST"])
def embeddings():
    return _serve("embeddings")


@_route("/models", methods=["GET"])
def models():
    """Every name and alias served, and the listed models behind the patterns (no upstream
    call: ``ModelDiscovery`` asked in the background): those the key may use, so a tenant
    learns nothing of the models it may not."""
    tenant = g.request.tenant
    models = [entry for entry in proxy().router.models() if tenant.allows_model(entry[0])]
    if request.headers.get("anthropic-version"):  # an Anthropic client: its list's shape
        return Response(orjson.dumps(anthropic_models(models)), mimetype="application/json")
    data = [_model(name, owner, created) for name, owner, created in models]
    return Response(orjson.dumps({"object": "list", "data": data}), mimetype="application/json")


@_route("/models/<path:model>", methods=["GET"])
def model(model):
    """One model in OpenAI's shape (ids such as ``org/name`` have slashes), or a 404, also for
    a model the key may not use (the same 404: whether it exists is not the key's business)."""
    found = proxy().router.model(model) if g.request.tenant.allows_model(model) else None
    if found is None:
        raise ModelNotFound(f"The model {model!r} does not exist or is not served by this proxy.",
                            param="model")
    return Response(orjson.dumps(_model(model, *found)), mimetype="application/json")


def _model(name, owner, created):
    return {"id": name, "object": "model", "created": created, "owned_by": owner}


def anthropic_models(models) -> dict:
    """The list in Anthropic's shape, whole in one page (``has_more`` false): each model's
    ``created_at`` in RFC 3339 (the epoch when unknown), its id as its display name."""
    data = [{"type": "model", "id": name, "display_name": name, "created_at": _rfc3339(created)}
            for name, _, created in models]
    return {"data": data, "has_more": False, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None}


def _rfc3339(created: int) -> str:
    """An upstream's ``created`` (epoch seconds) in RFC 3339; the epoch for one out of range."""
    try:
        moment = datetime.fromtimestamp(created, timezone.utc)
    except (OverflowError, OSError, ValueError):
        moment = datetime.fromtimestamp(0, timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _serve(endpoint):
    """Parse and validate the body into a Call and answer it; legacy clients need no
    Content-Type."""
    raw = request.get_data(cache=False)
    body = validate(endpoint, parse_body(raw))
    stream = endpoint != "embeddings" and body.get("stream") is True
    return answer(Call(endpoint, body, raw, stream))
