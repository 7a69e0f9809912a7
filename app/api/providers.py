"""``GET /providers``: what each configured provider is and serves, and whether the variable
meant to hold its key is set (never the key itself)."""

from __future__ import annotations

import orjson
from flask import Blueprint, Response

from app.api import authenticate, proxy

bp = Blueprint("providers", __name__)
bp.before_request(authenticate)  # the configuration is the clients' business, not the world's


@bp.get("/providers")
def list_providers():
    llm_proxy = proxy()
    breakers = llm_proxy.breakers.snapshot()
    data = []
    for adapter in llm_proxy.providers:
        s = adapter.settings
        bulkhead = llm_proxy.bulkheads[adapter.name]
        data.append({"name": adapter.name, "type": s.type, "models": s.models,
                     "aliases": s.aliases, "enabled": s.enabled, "priority": s.priority,
                     "weight": s.weight, "in_flight": bulkhead.in_flight,
                     "max_in_flight": bulkhead.limit, "circuit_breaker": breakers[adapter.name],
                     "key": _key(adapter)})
    return Response(orjson.dumps({"providers": data}), mimetype="application/json")


def _key(adapter):
    """The key variable and whether it is set; None for a provider that takes no key."""
    env = adapter.settings.api_key_env
    return {"env": env, "set": not adapter.missing_key} if env else None
