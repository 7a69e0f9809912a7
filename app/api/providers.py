"""``GET /providers``: what each configured provider is and serves, and whether the variable
meant to hold its key is set (never the key itself).

Every provider and model, of every tenant: with ``auth.providers_require_admin`` (the
production profile) only the admin key reads it; otherwise any client key does (or anyone when
keys are off), as in a single-team development setup, and the admin key too.
"""

from __future__ import annotations

import orjson
from flask import Blueprint, Response, request

from app.api import authenticate, proxy
from app.auth import is_admin_key, presented_key
from app.errors import AdminDisabled, AdminRefused, AuthError

bp = Blueprint("providers", __name__)


@bp.before_request
def require_key():
    """The admin key where the providers are the operator's business alone, else a client key
    (the configuration is the clients' business, not the world's)."""
    settings = proxy().settings
    admin = _is_admin_key(settings.admin_api_key)
    if not settings.auth.providers_require_admin:
        if not admin:
            authenticate()
    elif not settings.admin_api_key:
        raise AdminDisabled("/providers needs the admin key (auth.providers_require_admin): set "
                            "ADMIN_API_KEY to enable it.")
    elif not admin:
        raise AdminRefused("/providers requires the admin key.",
                           headers={"WWW-Authenticate": "Bearer"})


def _is_admin_key(admin_key) -> bool:
    if not admin_key:
        return False
    try:
        return is_admin_key(presented_key(request.headers), admin_key)
    except AuthError:  # malformed key headers: not the admin's
        return False


@bp.get("/providers")
def list_providers():
    llm_proxy = proxy()
    breakers = llm_proxy.breakers.snapshot()
    open_models = llm_proxy.breakers.open_models()
    data = []
    for adapter in llm_proxy.providers:
        s = adapter.settings
        bulkhead = llm_proxy.bulkheads[adapter.name]
        data.append({"name": adapter.name, "type": s.type, "models": s.models,
                     "aliases": s.aliases, "enabled": s.enabled, "priority": s.priority,
                     "weight": s.weight, "in_flight": bulkhead.in_flight,
                     "max_in_flight": bulkhead.limit, "circuit_breaker": breakers[adapter.name],
                     # the models of this provider kept away now (open or cooling down)
                     "model_breakers": open_models.get(adapter.name, {}),
                     "key": _key(adapter)})
    return Response(orjson.dumps({"providers": data}), mimetype="application/json")


def _key(adapter):
    """The key variable and whether it is set; None for a provider that takes no key."""
    env = adapter.settings.api_key_env
    return {"env": env, "set": not adapter.missing_key} if env else None
