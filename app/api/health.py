"""``/health`` (every check, no upstream call), ``/health/live`` and ``/health/ready``; no upstream calls.

Status rules: ``unhealthy`` (HTTP 503) when no provider can serve or memory is critical;
``warning`` (HTTP 200) when a check warns (a breaker open, a provider's or a model's, an
enabled provider whose key variable is unset, memory past its threshold, an upstream error rate
over 10% across at least 20 calls, Redis unreachable while the proxy serves from its local
stores); ``healthy`` otherwise. The ``providers`` check names each unset key variable in
``missing_keys``, there only when one is: otherwise every check keeps its documented fields; so
does the ``circuit_breakers`` check with ``open_models``, how many models of each provider are
kept away now (their breaker open or cooling down): counted, not named, since anyone may read
this and a pattern provider's model names are whatever clients asked for (``/providers`` and
``/metrics`` name them, behind keys). The ``redis`` check is there only with ``REDIS_URL``. The ``database`` check (keys, spend, the
request log: app/store/) is there with the database on: a warning while the database fails or
its writer's queue is 80% full (requests are served either way); ``dropped`` counts the rows it
could not keep.
"""

from __future__ import annotations

import time

import orjson
from flask import Blueprint, Response

from app.api import proxy
from app.upstream.client import combined_stats

bp = Blueprint("health", __name__)

ERROR_RATE_WARNING = 0.10
ERROR_RATE_MIN_CALLS = 20
_RANK = {"healthy": 0, "warning": 1, "unhealthy": 2}


@bp.get("/health")
def health():
    llm_proxy = proxy()
    checks = {"providers": _providers(llm_proxy), "memory": _memory(llm_proxy),
              "cache": _cache(llm_proxy), "http_client": _http_client(llm_proxy),
              "circuit_breakers": _breakers(llm_proxy)}
    if llm_proxy.shared is not None:
        checks["redis"] = _redis(llm_proxy)
    if llm_proxy.store is not None:
        checks["database"] = llm_proxy.store.health()
    status = max((c["status"] for c in checks.values()), key=_RANK.__getitem__)
    body = {"status": status, "timestamp": time.time(), "version": llm_proxy.settings.version,
            "uptime": round(time.time() - llm_proxy.started_at, 1), "checks": checks}
    return _json(body, 503 if status == "unhealthy" else 200)


@bp.get("/health/live")
def live():
    return _json({"status": "alive"}, 200)


@bp.get("/health/ready")
def ready():
    serving = _serving(proxy())
    return _json({"status": "ready" if serving else "not_ready", "providers_available": serving},
                 200 if serving else 503)


def _serving(llm_proxy) -> int:
    """Enabled providers whose breaker is not open (or is due for a trial)."""
    breakers = llm_proxy.breakers.snapshot()
    return sum(1 for a in llm_proxy.providers if a.settings.enabled
               and (breakers[a.name]["state"] != "open" or breakers[a.name]["retry_in"] == 0))


def _providers(llm_proxy):
    enabled = sum(1 for a in llm_proxy.providers if a.settings.enabled)
    serving = _serving(llm_proxy)
    missing = [{"provider": a.name, "env": a.missing_key} for a in llm_proxy.providers
               if a.settings.enabled and a.missing_key]
    status = ("unhealthy" if serving == 0 else "warning" if serving < enabled or missing
              else "healthy")
    check = {"status": status, "total": len(llm_proxy.providers), "enabled": enabled}
    if missing:  # the calls of these go without a key: most upstreams refuse them
        check["missing_keys"] = missing
    return check


def _memory(llm_proxy):
    stats = llm_proxy.memory.stats()
    pressure = stats.get("pressure", "normal")
    status = {"critical": "unhealthy", "high": "warning"}.get(pressure, "healthy")
    return {"status": status, "usage_percent": stats.get("usage_percent"),
            "used_mb": stats.get("used_mb"), "available_mb": stats.get("available_mb")}


def _cache(llm_proxy):
    stats = llm_proxy.caches.stats()["response_cache"]
    return {"status": "healthy", "entries": stats["entries"], "hit_rate": stats["hit_rate"],
            "memory_mb": stats["memory_mb"]}


def _http_client(llm_proxy):
    stats = combined_stats(a.http for a in llm_proxy.providers if a.http is not None)
    warn = (stats["requests_total"] >= ERROR_RATE_MIN_CALLS
            and stats["error_rate"] > ERROR_RATE_WARNING)
    return {"status": "warning" if warn else "healthy", "requests_total": stats["requests_total"],
            "error_rate": stats["error_rate"],
            "avg_response_time_ms": stats["avg_response_time_ms"]}


def _breakers(llm_proxy):
    states = [s["state"] for s in llm_proxy.breakers.snapshot().values()]
    closed = states.count("closed")
    models = llm_proxy.breakers.open_models()
    # a model only cooling down after a 429 is listed, but is no warning: its circuit is closed
    healthy = closed == len(states) and all(
        snap["state"] == "closed" for found in models.values() for snap in found.values())
    check = {"status": "healthy" if healthy else "warning", "total": len(states),
             "open": len(states) - closed, "closed": closed}
    if models:  # one model's trouble, the provider's other models still served
        check["open_models"] = {provider: len(found) for provider, found in models.items()}
    return check


def _redis(llm_proxy):
    """Only with REDIS_URL: a warning while the proxy serves from its local stores."""
    stats = llm_proxy.shared.stats()
    return {"status": "healthy" if stats["state"] == "closed" else "warning", **stats}


def _json(body, status):
    return Response(orjson.dumps(body), status=status, mimetype="application/json")
