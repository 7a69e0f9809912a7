"""``/debug/*``: operator routes, closed without the admin key and disabled when it is unset."""

from __future__ import annotations

import hashlib
import hmac

import orjson
from flask import Blueprint, Response, request

from app import leaks
from app.api import proxy
from app.auth import presented_key
from app.errors import ProxyError

bp = Blueprint("admin", __name__, url_prefix="/debug")


class AdminRefused(ProxyError):
    """The admin key is missing or wrong."""
    status, type, code = 401, "authentication_error", "invalid_admin_key"


class AdminDisabled(ProxyError):
    """No admin key is configured, so the debug routes are off."""
    status, type, code = 403, "permission_error", "admin_disabled"


def is_admin_key(given: str | None) -> bool:
    """Whether ``given`` is the admin key (false when none is configured)."""
    expected = proxy().settings.admin_api_key
    # Compare digests so the comparison takes the same time whatever the lengths.
    return bool(expected and given) and hmac.compare_digest(
        hashlib.sha256(given.encode()).digest(), hashlib.sha256(expected.encode()).digest())


@bp.before_request
def require_admin_key():
    if not proxy().settings.admin_api_key:
        raise AdminDisabled("The /debug routes are disabled: set ADMIN_API_KEY to enable them.")
    if not is_admin_key(presented_key(request.headers)):
        raise AdminRefused("A valid admin key is required for /debug routes.",
                           headers={"WWW-Authenticate": "Bearer"})


@bp.post("/circuit-breakers/reset")
def reset_breakers():
    """Close every breaker, or the one named by ``?name=``."""
    breakers = proxy().breakers
    name = request.args.get("name")
    if name is not None and name not in breakers:
        raise ProxyError(f"No provider named {name!r}.", status=404, code="provider_not_found")
    breakers.reset(name)
    return Response(orjson.dumps({"reset": [name] if name else [b.name for b in breakers],
                                  "circuit_breakers": breakers.snapshot()}),
                    mimetype="application/json")


@bp.post("/cache/clear")
def clear_cache():
    """Empty both caches, or the one named by ``?name=response`` or ``?name=summary``."""
    caches = proxy().caches
    name = request.args.get("name")
    if name not in (None, "response", "summary"):
        raise ProxyError(f"No cache named {name!r}: use response or summary.", status=404,
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
        raise ProxyError(f"Unknown level {level!r}: use normal or emergency.", param="level",
                         status=400, code="invalid_value")
    return Response(orjson.dumps(proxy().memory.cleanup(level)), mimetype="application/json")


@bp.post("/memory/tracemalloc/<action>")
def tracemalloc_switch(action):
    """Start or stop tracemalloc: on demand only, it slows the proxy several-fold."""
    if action == "start":
        changed = leaks.start_tracemalloc(frames=request.args.get("frames", 1, type=int))
    elif action == "stop":
        changed = leaks.stop_tracemalloc()
    else:
        raise ProxyError(f"Unknown action {action!r}: use start or stop.", status=404,
                         code="not_found")
    return Response(orjson.dumps({"action": action, "changed": changed}),
                    mimetype="application/json")


@bp.get("/memory/tracemalloc")
def tracemalloc_top():
    """The allocation sites holding the most memory while tracemalloc runs."""
    top = leaks.tracemalloc_top(request.args.get("n", 20, type=int))
    return Response(orjson.dumps({"top": top}), mimetype="application/json")
