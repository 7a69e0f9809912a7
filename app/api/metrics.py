"""``GET /metrics``: Prometheus text, or the seed's JSON shape for ``Accept: application/json``
or ``?format=json``. Absent (404) when metrics are off."""

from __future__ import annotations

import orjson
from flask import Blueprint, Response, request
from prometheus_client import CONTENT_TYPE_LATEST

from app.api import proxy
from app.errors import ProxyError
from app.metrics import json_view

bp = Blueprint("metrics", __name__)


@bp.get("/metrics")
def metrics():
    llm_proxy = proxy()
    if not llm_proxy.metrics.enabled:
        raise ProxyError("Metrics are disabled (METRICS_ENABLED=false).", status=404,
                         code="metrics_disabled")
    wants_json = (request.args.get("format") == "json"
                  or request.accept_mimetypes.best_match(["text/plain", "application/json"])
                  == "application/json")
    if wants_json:
        return Response(orjson.dumps(json_view(llm_proxy)), mimetype="application/json")
    return Response(llm_proxy.metrics.prometheus_text(), content_type=CONTENT_TYPE_LATEST)
