"""The console's keys page: every key with its usage, rate-limit headroom and spend against its
budget, and the forms that create, rotate and revoke database keys through the same store code
as the admin API (``/admin/keys``), audited as ``console <address>``."""

from __future__ import annotations

import math
import re

from app.auth import Tenant
from app.console import figures as fmt
from app.console.figures import Figures
from app.console.pages import spend_report
from app.errors import InvalidRequest, ProxyError, StoreDisabled
from app.pipeline.limits import REQUESTS, TOKENS
from app.store.keys import BUDGET_FIELDS, parse_fields
from app.store.spend import PERIODS, day_of
from settings import LIMIT_FIELDS

PAGE_SIZE = 100
MAX_PAGE = 10_000
_WHOLE = re.compile(r"^[0-9]{1,10}$")
_AMOUNT = re.compile(r"^[0-9]{1,12}(\.[0-9]{1,10})?$")
_LOCAL_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2})?$")  # <input datetime-local>
_MODELS = re.compile(r"[,\s]+")
MAX_FIELD = 4096  # characters of one form field looked at


def keys_page(p, *, revoked: bool = False, page: int = 1) -> dict:
    """The configuration's keys (read-only) and the database's, ``PAGE_SIZE`` a page."""
    store = p.store
    now = p.wall()
    made, usage_today, usage_month, note = [], {}, {}, None
    if store is None:
        note = ("The database is off (DATABASE_ENABLED=false): keys made here, spend and the "
                "request log need it. The configuration's keys are listed, read-only.")
    else:
        today = day_of(now)
        try:
            with store.guarded():
                made = store.keys.list(revoked=revoked)
            usage_today = _by_key(spend_report(store, start=today, end=today, group_by="key"))
            usage_month = _by_key(spend_report(store, start=today[:8] + "01", end=today,
                                               group_by="key"))
        except ProxyError as e:
            note = e.message
    configured = list(p.keys.records)
    total = len(configured) + len(made)
    pages = max(1, -(-total // PAGE_SIZE))
    page = min(max(1, page), pages)
    first = (page - 1) * PAGE_SIZE
    shown = [("config", r) for r in configured] + [("database", k) for k in made]
    shown = shown[first:first + PAGE_SIZE]
    out = Figures()
    rows = []
    defaults = p.settings.auth
    for source, key in shown:
        if source == "config":
            tenant = Tenant.of(key)
            row = {"id": key.id, "source": source, "models": list(key.models), "owner": "",
                   "team": "", "enabled": True, "revoked": False, "expires": fmt.DASH,
                   "budget": None}
        else:
            tenant = Tenant(key["id"], tuple(key["models"]),
                            _rate(key["requests_per_minute"], defaults.requests_per_minute),
                            _rate(key["tokens_per_minute"], defaults.tokens_per_minute),
                            key["max_in_flight"])
            row = {"id": key["id"], "source": source, "models": key["models"],
                   "owner": key["owner"], "team": key["team"], "enabled": key["enabled"],
                   "revoked": key["revoked_at"] is not None,
                   "expires": fmt.iso_text(key["expires_at"]), "budget": key["budget"]}
        rows.append(row)
        _usage(out, key_id=row["id"], today=usage_today.get(row["id"]),
               month=usage_month.get(row["id"]))
        _headroom(out, p.limiter, tenant)
        if row["budget"] is not None and store is not None:
            _spend(out, row["id"], row["budget"], store.ledger.spent(row["id"]))
    return {"figures": out, "keys": rows, "note": note, "database": store is not None,
            "revoked": revoked, "page_number": page, "pages": pages,
            "grace": store.settings.rotation_grace if store is not None else 0}


def _by_key(report: dict) -> dict:
    return {row["key_id"]: row for row in report["data"]}


def _rate(value, default):
    """A database key's rate: null is the deployment's default, 0 unlimited (as the key
    directory reads it, app/store/keys.py)."""
    return (default or None) if value is None else (value or None)


def _usage(out: Figures, *, key_id, today, month) -> None:
    key = f"key-{key_id}"
    today = today or {}
    out.fields[f"{key}-requests_today"] = fmt.count(today.get("requests", 0))
    out.fields[f"{key}-tokens_today"] = fmt.count(
        today.get("prompt_tokens", 0) + today.get("completion_tokens", 0))
    out.fields[f"{key}-cost_today"] = fmt.usd(today.get("cost_usd", 0.0))
    out.fields[f"{key}-cost_month"] = fmt.usd((month or {}).get("cost_usd", 0.0))


def _headroom(out: Figures, limiter, tenant: Tenant) -> None:
    """What is left of the key's per-minute limits in this process's buckets (the shared
    ones with Redis). Read by a take of nothing, which changes no bucket (the limiter's
    buckets are named ``{kind}:{key id}``, app/pipeline/limits.py)."""
    for kind, configured, name in ((REQUESTS, tenant.requests_per_minute, "requests_left"),
                                   (TOKENS, tenant.tokens_per_minute, "tokens_left")):
        field = f"key-{tenant.id}-{name}"
        if not configured:
            out.fields[field] = "unlimited"
            continue
        limit = limiter.share.of(configured)
        if not limit:
            out.fields[field] = f"0 of 0 (this worker's share of {configured:,})"
            continue
        took = limiter.store.take(f"{kind}:{tenant.id}", limit=limit, window=limiter.window,
                                  burst=limit, cost=0, need=0, now=limiter.clock())
        left = max(0, math.floor(took.remaining))
        out.fields[field] = f"{left:,} of {limit:,}"
        out.values[field] = str(left)


def _spend(out: Figures, key_id: str, budget: dict, spent: dict) -> None:
    for period in PERIODS:
        limit = budget.get(f"{period}_usd")
        field = f"key-{key_id}-spend_{period}"
        if limit is None:
            out.fields[field] = f"{fmt.usd(spent[period])} (no budget)"
            continue
        share = spent[period] / limit if limit else 1.0
        out.fields[field] = f"{fmt.usd(spent[period])} of {fmt.usd(limit)}"
        out.states[field] = "over" if share >= 1 else "near" if share >= 0.8 else "ok"


# -- the forms ------------------------------------------------------------------------------

def _text(form, name) -> str:
    return (form.get(name) or "")[:MAX_FIELD].strip()


def _bad(name, message) -> InvalidRequest:
    return InvalidRequest(f"{name.replace('_', ' ')}: {message}.", param=name,
                          code="invalid_value")


def key_fields(form) -> tuple[str | None, dict]:
    """The new key's id (None: one is made) and its columns from the create form, checked
    as the admin API checks a JSON body (``parse_fields``); InvalidRequest naming the field."""
    body: dict = {}
    key_id = _text(form, "id") or None
    for name in ("owner", "team"):
        if value := _text(form, name):
            body[name] = value
    if models := _text(form, "models"):
        body["models"] = [m for m in _MODELS.split(models) if m]
    for name in LIMIT_FIELDS:
        if raw := _text(form, name):
            if not _WHOLE.match(raw):
                raise _bad(name, "must be a whole number, 0 or more (0: unlimited), or empty "
                                 "(the default)")
            body[name] = int(raw)
    budget = {}
    for name in BUDGET_FIELDS:
        if raw := _text(form, name):
            if not _AMOUNT.match(raw):
                raise _bad(name, "must be a number, 0 or more (e.g. 12.50), or empty")
            budget[name] = float(raw)
    if budget:
        body["budget"] = budget
    if raw := _text(form, "expires_at"):
        body["expires_at"] = raw + "Z" if _LOCAL_TIME.match(raw) else raw  # the form says UTC
    return key_id, parse_fields(body, creating=False)


def grace_seconds(form, default: float) -> float:
    """The rotate form's grace (seconds the old secret keeps working); empty: the default."""
    raw = _text(form, "grace_seconds")
    if not raw:
        return default
    if not _WHOLE.match(raw) or int(raw) > 365 * 86400:
        raise _bad("grace_seconds", "must be a whole number of seconds from 0 to a year")
    return float(raw)


def store_of(p):
    if p.store is None:
        raise StoreDisabled("The database is off (DATABASE_ENABLED=false): keys are made, "
                            "rotated and revoked in it.")
    return p.store


def create(p, form, actor: str) -> tuple[str, dict]:
    """A new key from the create form: (its secret, shown once; the key)."""
    key_id, fields = key_fields(form)
    s = store_of(p)
    with s.guarded():
        secret, key = s.keys.create(fields, actor, key_id)
        s.changed()
    return secret, key


def rotate(p, key_id: str, form, actor: str) -> tuple[str, dict]:
    s = store_of(p)
    grace = grace_seconds(form, s.settings.rotation_grace)
    with s.guarded():
        secret, key = s.keys.rotate(key_id, grace, actor)
        s.changed()
    return secret, key


def revoke(p, key_id: str, actor: str) -> dict:
    s = store_of(p)
    with s.guarded():
        key = s.keys.revoke(key_id, actor)
        s.changed()
    return key


def actor(address: str | None) -> str:
    """Who made a change, in the audit trail."""
    return f"console {address or '-'}"

