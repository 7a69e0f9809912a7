"""API keys in the database: their records and audit trail (the admin API and the CLI write
them), and ``KeyDirectory``, the in-process copy the request path reads.

A key's secret is shown once, when it is made or rotated; the table keeps its SHA-256. After a
rotation the previous secret keeps working for a grace period. Revoking keeps the row (its
spend and audit trail refer to it) and the directory drops it at its next load.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import datetime

import orjson
import sqlalchemy as sa

from app.auth import KEY_PREFIX, Tenant
from app.errors import AuthError, Conflict, InvalidRequest, NotFound
from app.store.schema import audit, keys
from app.store.spend import Budget, iso
from settings import ANONYMOUS, LIMIT_FIELDS, check_key_id

MAX_TEXT = 200  # owner and team
UNAUTHENTICATED = "unauthenticated"  # the request log's key id of a request its key refused
MAX_METADATA_BYTES = 16 * 1024
MAX_MODELS = 256
MAX_TIME = 253402300799.0  # 9999-12-31T23:59:59Z, the last second a date can show
BUDGET_FIELDS = ("daily_usd", "monthly_usd", "total_usd", "soft_limit_percent")
EDITABLE = ("owner", "team", "models", *LIMIT_FIELDS, "budget", "expires_at", "metadata",
            "enabled")


def new_secret() -> tuple[str, str]:
    """A new key and its SHA-256 (hex)."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    return key, hashlib.sha256(key.encode()).hexdigest()


def parse_fields(body, *, creating: bool) -> dict:
    """The columns an admin API or CLI body sets; InvalidRequest naming the first bad field."""
    if not isinstance(body, dict):
        raise InvalidRequest("The body must be a JSON object.")
    allowed = (("id",) if creating else ()) + EDITABLE
    for name in body:
        if name not in allowed:
            raise InvalidRequest(f"Unknown field {name!r} (known: {', '.join(allowed)}).",
                                 param=name, code="unknown_field")
    out: dict = {}
    for name in ("owner", "team"):
        if name in body:
            value = body[name]
            # no NUL: PostgreSQL's text cannot hold it
            if not isinstance(value, str) or len(value) > MAX_TEXT or "\x00" in value:
                raise _bad(name, f"must be text of at most {MAX_TEXT} characters")
            out[name] = value
    if "models" in body:
        models = body["models"]
        if (not isinstance(models, list) or len(models) > MAX_MODELS or not all(
                isinstance(m, str) and m.strip() and len(m) <= MAX_TEXT for m in models)):
            raise _bad("models", f"must be a list of at most {MAX_MODELS} model names or glob "
                                 "patterns ([]: every model)")
        out["models"] = [m.strip() for m in models]
    for name in LIMIT_FIELDS:
        if name in body:
            value = body[name]
            if value is not None and (type(value) is not int or not 0 <= value < 2**31):
                raise _bad(name, "must be a whole number, 0 or more (0: unlimited), or null "
                                 "(the default)")
            out[name] = value
    if "budget" in body:
        out.update(_budget(body["budget"]))
    if "expires_at" in body:
        out["expires_at"] = parse_time(body["expires_at"], "expires_at")
    if "metadata" in body:
        metadata = body["metadata"]
        try:
            size = len(orjson.dumps(metadata)) if isinstance(metadata, dict) else None
        except TypeError:  # nested deeper than orjson writes (254 levels)
            size = None
        if size is None or size > MAX_METADATA_BYTES:
            raise _bad("metadata", f"must be a JSON object of at most {MAX_METADATA_BYTES} bytes")
        out["metadata"] = metadata
    if "enabled" in body:
        if not isinstance(body["enabled"], bool):
            raise _bad("enabled", "must be true or false")
        out["enabled"] = body["enabled"]
    return out


def _budget(value) -> dict:
    if value is None:
        return {f"budget_{f}" if f != "soft_limit_percent" else f: None for f in BUDGET_FIELDS}
    if not isinstance(value, dict):
        raise _bad("budget", "must be an object with daily_usd, monthly_usd, total_usd, "
                             "soft_limit_percent, or null")
    out = {}
    for name, amount in value.items():
        if name not in BUDGET_FIELDS:
            raise _bad(f"budget.{name}", f"is unknown (known: {', '.join(BUDGET_FIELDS)})")
        ok = amount is None or (isinstance(amount, (int, float)) and not isinstance(amount, bool)
                                and math.isfinite(amount) and amount >= 0)
        if ok and name == "soft_limit_percent" and amount is not None:
            ok = 0 < amount <= 100
        if not ok:
            raise _bad(f"budget.{name}", "must be a number of USD, 0 or more, or null"
                       if name != "soft_limit_percent" else "must be a percentage, 0 to 100")
        out[f"budget_{name}" if name != "soft_limit_percent" else name] = (
            None if amount is None else float(amount))
    return out


def parse_time(value, name) -> float | None:
    """ISO 8601 (a time zone required) or UNIX seconds, from 1970 to the year 9999 (a time
    outside has no date to show it as)."""
    if value is None:
        return None
    seconds = None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        seconds = float(value)
    elif isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            parsed = None
        if parsed is not None and parsed.tzinfo is not None:
            seconds = parsed.timestamp()
    if seconds is not None and 0 <= seconds <= MAX_TIME:
        return seconds
    raise _bad(name, "must be an ISO 8601 time with its zone (2027-01-31T00:00:00Z) or "
                     "UNIX seconds, from 1970 to 9999")


def _bad(name, message) -> InvalidRequest:
    return InvalidRequest(f"{name} {message}.", param=name, code="invalid_value")


def to_json(row) -> dict:
    """A key as the admin API shows it: never its secret or digest."""
    budget = Budget(row.budget_daily_usd, row.budget_monthly_usd, row.budget_total_usd,
                    row.soft_limit_percent)
    return {"id": row.id, "source": "database", "owner": row.owner, "team": row.team,
            "models": list(row.models), **{f: getattr(row, f) for f in LIMIT_FIELDS},
            "budget": budget.to_json() if budget.limits() or row.soft_limit_percent is not None
            else None,
            "expires_at": iso(row.expires_at), "metadata": row.metadata,
            "enabled": row.enabled, "created_at": iso(row.created_at),
            "updated_at": iso(row.updated_at), "revoked_at": iso(row.revoked_at),
            "previous_secret_valid_until": iso(row.previous_valid_until)
            if row.previous_sha256 else None}


class KeyTable:
    """The keys table and its audit trail. Every change is one transaction with its audit row;
    ``config_ids`` are the ids of the config file's keys, which the API may not take or
    change."""

    def __init__(self, engine, *, config_ids=(), wall=time.time):
        self.engine = engine
        self.config_ids = frozenset(config_ids)
        self.wall = wall

    def create(self, fields: dict, actor: str, key_id: str | None = None) -> tuple[str, dict]:
        if key_id is None:
            key_id = f"key-{secrets.token_hex(6)}"
        try:
            check_key_id(key_id, "id")
        except ValueError as e:
            raise InvalidRequest(str(e), param="id", code="invalid_value") from None
        if key_id in (ANONYMOUS, UNAUTHENTICATED):
            raise Conflict(f"The key id {key_id!r} is reserved.", code="key_exists")
        if key_id in self.config_ids:
            raise Conflict(f"The key id {key_id!r} is taken by a key of the configuration.",
                           code="key_exists")
        secret, digest = new_secret()
        now = self.wall()
        values = {"owner": "", "team": "", "models": [], "metadata": {}, "enabled": True,
                  **fields, "id": key_id, "sha256": digest, "created_at": now,
                  "updated_at": now}
        exists = Conflict(f"A key with the id {key_id!r} exists.", code="key_exists")
        try:
            with self.engine.begin() as connection:
                if connection.execute(sa.select(keys.c.id).where(keys.c.id == key_id)).first():
                    raise exists
                connection.execute(keys.insert().values(**values))
                self._audit(connection, actor, "create", key_id, fields)
                row = self._row(connection, key_id)
        except sa.exc.IntegrityError:  # made by another call between our check and insert
            raise exists from None
        return secret, to_json(row)

    def get(self, key_id: str) -> dict:
        with self.engine.connect() as connection:
            return to_json(self._row(connection, key_id))

    def list(self, *, revoked: bool = False) -> list[dict]:
        query = sa.select(keys).order_by(keys.c.created_at, keys.c.id)
        if not revoked:
            query = query.where(keys.c.revoked_at.is_(None))
        with self.engine.connect() as connection:
            return [to_json(row) for row in connection.execute(query)]

    def update(self, key_id: str, fields: dict, actor: str) -> dict:
        with self.engine.begin() as connection:
            self._live(connection, key_id)
            if fields:
                connection.execute(keys.update().where(keys.c.id == key_id)
                                   .values(**fields, updated_at=self.wall()))
                self._audit(connection, actor, "update", key_id, fields)
            return to_json(self._row(connection, key_id))

    def rotate(self, key_id: str, grace: float, actor: str) -> tuple[str, dict]:
        """A new secret; the current one stays valid ``grace`` seconds (0: not at all)."""
        secret, digest = new_secret()
        now = self.wall()
        with self.engine.begin() as connection:
            row = self._live(connection, key_id)
            connection.execute(keys.update().where(keys.c.id == key_id).values(
                sha256=digest, previous_sha256=row.sha256 if grace > 0 else None,
                previous_valid_until=now + grace if grace > 0 else None, updated_at=now))
            self._audit(connection, actor, "rotate", key_id, {"grace_seconds": grace})
            return secret, to_json(self._row(connection, key_id))

    def revoke(self, key_id: str, actor: str) -> dict:
        now = self.wall()
        with self.engine.begin() as connection:
            self._live(connection, key_id)
            connection.execute(keys.update().where(keys.c.id == key_id).values(
                revoked_at=now, enabled=False, previous_sha256=None, previous_valid_until=None,
                updated_at=now))
            self._audit(connection, actor, "revoke", key_id, {})
            return to_json(self._row(connection, key_id))

    def audit_trail(self, key_id: str | None = None, limit: int = 100) -> list[dict]:
        query = sa.select(audit).order_by(audit.c.id.desc()).limit(limit)
        if key_id is not None:
            query = query.where(audit.c.key_id == key_id)
        with self.engine.connect() as connection:
            return [{"at": iso(r.at), "actor": r.actor, "action": r.action, "key_id": r.key_id,
                     "detail": r.detail} for r in connection.execute(query)]

    def everyone(self, connection) -> list:
        """Every key, revoked ones included, for the directory."""
        return list(connection.execute(sa.select(keys)))

    def _row(self, connection, key_id):
        row = connection.execute(sa.select(keys).where(keys.c.id == key_id)).first()
        if row is None:
            if key_id in self.config_ids:
                raise Conflict(f"The key {key_id!r} comes from the configuration: it is "
                               "read-only here (change it in the config file or "
                               "PROXY_API_KEYS).", code="key_read_only")
            raise NotFound(f"No key with the id {key_id!r}.", code="key_not_found")
        return row

    def _live(self, connection, key_id):
        row = self._row(connection, key_id)
        if row.revoked_at is not None:
            raise Conflict(f"The key {key_id!r} is revoked.", code="key_revoked")
        return row

    def _audit(self, connection, actor, action, key_id, detail):
        connection.execute(audit.insert().values(at=self.wall(), actor=actor[:MAX_TEXT],
                                                 action=action, key_id=key_id, detail=detail))


@dataclass(frozen=True)
class _Entry:
    tenant: Tenant
    enabled: bool
    expires_at: float | None
    valid_until: float | None = None  # a rotated-out secret's end


class KeyDirectory:
    """The database's keys by digest, as the request path reads them: replaced whole by each
    ``load`` (every ``database.refresh_interval`` seconds, and on every change), so a lookup is
    one dict access with no lock and no database call."""

    def __init__(self, auth_settings, *, wall=time.time):
        a = auth_settings
        # what a key leaves null: the deployment's defaults (settings.auth)
        self.defaults = (tuple(a.models), a.requests_per_minute or None,
                         a.tokens_per_minute or None, a.max_in_flight or None)
        self.wall = wall
        self._by_digest: dict[bytes, _Entry] = {}
        self.budgeted = False  # whether some key has a budget
        # Whether any key was ever made here: keys are then checked, even once every one is
        # revoked (else a revoked key would run as the anonymous client again).
        self.made = False
        self._lock = threading.Lock()  # loads only; lookups read the current dict

    def __len__(self) -> int:
        return len(self._by_digest)

    def load(self, rows) -> None:
        """The keys table's rows: the revoked ones are left out, but count in ``made``."""
        found: dict[bytes, _Entry] = {}
        for row in rows:
            if row.revoked_at is not None:
                continue
            tenant = self._tenant(row)
            entry = _Entry(tenant, row.enabled, row.expires_at)
            found[bytes.fromhex(row.sha256)] = entry
            if row.previous_sha256 and row.previous_valid_until:
                found[bytes.fromhex(row.previous_sha256)] = _Entry(
                    tenant, row.enabled, row.expires_at, row.previous_valid_until)
        with self._lock:
            self._by_digest = found
            self.budgeted = any(e.tenant.budget is not None for e in found.values())
            self.made = self.made or bool(rows)

    def _tenant(self, row) -> Tenant:
        models, rpm, tpm, in_flight = self.defaults
        budget = Budget(row.budget_daily_usd, row.budget_monthly_usd, row.budget_total_usd,
                        row.soft_limit_percent)
        return Tenant(row.id, tuple(row.models) or models,
                      _rate(row.requests_per_minute, rpm), _rate(row.tokens_per_minute, tpm),
                      in_flight if row.max_in_flight is None else row.max_in_flight,
                      budget=budget if budget.limits() or budget.soft_limit_percent else None)

    def lookup(self, digest: bytes) -> Tenant | None:
        """The tenant of a key's digest; None when unknown; AuthError when the key is disabled,
        expired, or a rotated-out secret past its grace."""
        entry = self._by_digest.get(digest)
        if entry is None:
            return None
        now = self.wall()
        if entry.valid_until is not None and now >= entry.valid_until:
            return None
        if not entry.enabled:
            raise AuthError("The API key is disabled.", code="disabled_api_key")
        if entry.expires_at is not None and now >= entry.expires_at:
            raise AuthError("The API key has expired.", code="expired_api_key")
        return entry.tenant


def _rate(value, default):
    """A key's rate: null is the default, 0 unlimited (None)."""
    return default if value is None else (value or None)
