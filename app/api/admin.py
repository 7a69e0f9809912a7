"""``/debug/*``: operator routes, closed without the admin key and disabled when it is unset
(``require_admin_key``, which the ``/admin/*`` blueprints use too)."""

from __future__ import annotations

import orjson
from flask import Blueprint, Response, request

from app.runtime import leaks
from app.api import proxy
from app.auth import is_admin_key, presented_key
from app.errors import AdminDisabled, AdminRefused, InvalidRequest, NotFound

bp = Blueprint("admin", __name__, url_prefix="/debug")


@bp.before_request
def require_admin_key():
    """Every admin route (``/debug/*``, ``/admin/*``): the admin key, or 401; 403 when none is
    configured."""
    admin_key = proxy().settings.admin_api_key
    if not admin_key:
        raise AdminDisabled(f"The admin routes ({request.path}) are disabled: set ADMIN_API_KEY "
                            "to enable them.")
    if not is_admin_key(presented_key(request.headers), admin_key):
        raise AdminRefused(f"A valid admin key is required for {request.path}.",
                           headers={"WWW-Authenticate": "Bearer"})


@bp.post("/circuit-breakers/reset")
def reset_breakers():
    """Close every breaker, or provider ``?name=``'s: the provider's and its models'."""
    breakers = proxy().breakers
    name = request.args.get("name")
    if name is not None and name not in breakers:
        raise NotFound(f"No provider named {name!r}.", code="provider_not_found")
    breakers.reset(name)
    return Response(orjson.dumps({"reset": [name] if name else [b.name for b in breakers],
                                  "circuit_breakers": breakers.snapshot(),
                                  "model_breakers": breakers.open_models()}),
                    mimetype="application/json")


@bp.post("/cache/clear")
def clear_cache():
    """Empty both caches, or the one named by ``?name=response`` or ``?name=summary``."""
    caches = proxy().caches
    name = request.args.get("name")
    if name not in (None, "response", "summary"):
        raise NotFound(f"No cache named {name!r}: use response or summary.",
                       code="cache_not_found")
    before = caches.stats()
    caches.clear(name)
    return Response(orjson.dumps({"cleared": [name] if name else ["response", "summary"],
                                  "before": before, "after": caches.stats()}),
                    mimetype="application/json")


@bp.post("/memory/cleanup")
def memory_cleanup():
    """Run a cleanup now (``?level=emergency`` for the hard one); before and after figures."""
    level = request.args.get("level", "normal")
    if level not in ("normal", "emergency"):
        raise InvalidRequest(f"Unknown level {level!r}: use normal or emergency.", param="level",
                             code="invalid_value")
    return Response(orjson.dumps(proxy().memory.cleanup(level)), mimetype="application/json")


@bp.post("/memory/tracemalloc/<action>")
def tracemalloc_switch(action):
    """Start or stop tracemalloc: on demand only, it slows the proxy several-fold."""
    if action == "start":
        changed = leaks.start_tracemalloc(frames=request.args.get("frames", 1, type=int))
    elif action == "stop":
        changed = leaks.stop_tracemalloc()
    else:
        raise NotFound(f"Unknown action {action!r}: use start or stop.")
    return Response(orjson.dumps({"action": action, "changed": changed}),
                    mimetype="application/json")


@bp.get("/memory/tracemalloc")
def tracemalloc_top():
    """The allocation sites holding the most memory while tracemalloc runs."""
    top = leaks.tracemalloc_top(request.args.get("n", 20, type=int))
    return Response(orjson.dumps({"top": top}), mimetype="application/json")
