"""``GET /providers``: what each configured provider is and serves."""

from __future__ import annotations

import orjson
from flask import Blueprint, Response

from app.api import proxy

bp = Blueprint("providers", __name__)


@bp.get("/providers")
def list_providers():
    data = [{"name": a.name, "type": a.settings.type, "models": a.settings.models,
             "aliases": a.settings.aliases, "enabled": a.settings.enabled,
             "priority": a.settings.priority} for a in proxy().providers]
    return Response(orjson.dumps({"providers": data}), mimetype="application/json")
