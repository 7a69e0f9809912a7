"""``/admin/keys``: API keys made, changed, rotated and revoked over HTTP (app/store/keys.py),
with the admin key. The configuration's keys are listed too, read-only. Every change is in the
audit trail (``GET /admin/audit``) and reaches every process within one refresh interval (at
once with Redis)."""

from __future__ import annotations

import math

import orjson
from flask import Blueprint, Response, request

from app.api import proxy
from app.api.admin import require_admin_key
from app.errors import InvalidRequest, StoreDisabled
from app.store.keys import parse_fields

bp = Blueprint("keys", __name__, url_prefix="/admin")
bp.before_request(require_admin_key)
MAX_AUDIT = 1000


def store():
    found = proxy().store
    if found is None:
        raise StoreDisabled("The database is off (DATABASE_ENABLED=false): keys made over HTTP, "
                            "spend and the request log need it.")
    return found


def json_body() -> dict:
    """The request's JSON object ({} for an empty body); 400 for anything else."""
    raw = request.get_data()
    if not raw.strip():
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest("The body is not valid JSON.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The body must be a JSON object.")
    return body


def actor() -> str:
    """Who made a change, for the audit trail: the admin key's holder at this address, and the
    name they give in ``X-Audit-Actor`` (optional)."""
    name = request.headers.get("X-Audit-Actor", "").strip()
    who = f"admin-api {request.remote_addr or '-'}"
    if name:
        who += " (" + "".join(c if c.isprintable() else "?" for c in name[:100]) + ")"
    return who


def reply(body, status=200) -> Response:
    return Response(orjson.dumps(body), status=status, mimetype="application/json")


@bp.post("/keys")
def create_key():
    body = json_body()
    key_id = body.pop("id", None)
    fields = parse_fields(body, creating=False)
    s = store()
    with s.guarded():
        secret, key = s.keys.create(fields, actor(), key_id)
        s.changed()
    return reply({**key, "key": secret}, 201)


@bp.get("/keys")
def list_keys():
    s = store()
    revoked = request.args.get("revoked", "false") == "true"
    with s.guarded():
        made = s.keys.list(revoked=revoked)
    return reply({"data": [_configured(r) for r in proxy().keys.records] + made})


def _configured(record) -> dict:
    """A key of the configuration (file or PROXY_API_KEYS), as the list shows it: read-only."""
    return {"id": record.id, "source": "config", "models": list(record.models),
            "requests_per_minute": record.requests_per_minute,
            "tokens_per_minute": record.tokens_per_minute,
            "max_in_flight": record.max_in_flight}


@bp.get("/keys/<key_id>")
def get_key(key_id):
    s = store()
    configured = next((r for r in proxy().keys.records if r.id == key_id), None)
    if configured is not None:
        return reply(_configured(configured))
    with s.guarded():
        key = s.keys.get(key_id)
    key["spend"] = s.ledger.spent(key_id)  # as this process knows it (written and in flight)
    return reply(key)


@bp.patch("/keys/<key_id>")
def update_key(key_id):
    fields = parse_fields(json_body(), creating=False)
    s = store()
    with s.guarded():
        key = s.keys.update(key_id, fields, actor())
        s.changed()
    return reply(key)


@bp.post("/keys/<key_id>/rotate")
def rotate_key(key_id):
    body = json_body()
    unknown = set(body) - {"grace_seconds"}
    if unknown:
        raise InvalidRequest(f"Unknown field {sorted(unknown)[0]!r} (known: grace_seconds).",
                             code="unknown_field")
    s = store()
    grace = body.get("grace_seconds", s.settings.rotation_grace)
    if (isinstance(grace, bool) or not isinstance(grace, (int, float))
            or not math.isfinite(grace) or not 0 <= grace <= 365 * 86400):
        raise InvalidRequest("grace_seconds must be a number of seconds from 0 to a year.",
                             param="grace_seconds", code="invalid_value")
    with s.guarded():
        secret, key = s.keys.rotate(key_id, float(grace), actor())
        s.changed()
    return reply({**key, "key": secret})


@bp.delete("/keys/<key_id>")
def revoke_key(key_id):
    s = store()
    with s.guarded():
        key = s.keys.revoke(key_id, actor())
        s.changed()
    return reply(key)


@bp.get("/audit")
def audit_trail():
    limit = request.args.get("limit", "100")
    if not limit.isdigit() or not 1 <= int(limit) <= MAX_AUDIT:
        raise InvalidRequest(f"limit must be a whole number from 1 to {MAX_AUDIT}.",
                             param="limit", code="invalid_value")
    s = store()
    with s.guarded():
        rows = s.keys.audit_trail(request.args.get("key_id"), int(limit))
    return reply({"data": rows})
