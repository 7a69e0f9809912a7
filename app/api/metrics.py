"""``GET /metrics``: Prometheus text, or the same as JSON for ``Accept: application/json``
or ``?format=json``. Absent (404) when metrics are off."""

from __future__ import annotations

import orjson
from flask import Blueprint, Response, request
from prometheus_client import CONTENT_TYPE_LATEST

from app.api import proxy
from app.auth import is_admin_key, presented_key
from app.errors import AuthError, NotFound
from app.observability.metrics import json_view

bp = Blueprint("metrics", __name__)


@bp.get("/metrics")
def metrics():
    llm_proxy = proxy()
    if llm_proxy.settings.auth.metrics_require_key:
        require_metrics_key(llm_proxy)
    if not llm_proxy.metrics.enabled:
        raise NotFound("Metrics are disabled (METRICS_ENABLED=false).", code="metrics_disabled")
    wants_json = (request.args.get("format") == "json"
                  or request.accept_mimetypes.best_match(["text/plain", "application/json"])
                  == "application/json")
    if wants_json:
        return Response(orjson.dumps(json_view(llm_proxy)), mimetype="application/json")
    return Response(llm_proxy.metrics.prometheus_text(), content_type=CONTENT_TYPE_LATEST)


def require_metrics_key(llm_proxy):
    """The admin key or any valid client key (a scraper gets a key of its own)."""
    if is_admin_key(presented_key(request.headers), llm_proxy.settings.admin_api_key):
        return
    if not llm_proxy.keys.enabled:
        raise AuthError("/metrics requires the admin key (no client keys are configured).")
    tenant = llm_proxy.keys.authenticate(request.headers)
    if tenant.anonymous:
        raise AuthError("/metrics requires an API key.", code="missing_api_key")
