"""The request log: the row each proxied request leaves (built on the request's thread, written
by the writer), and the admin API's reads of it.

Bodies are kept only with ``database.log_bodies``: each one truncated to
``database.log_body_max_kb``, after every secret the proxy knows (provider keys, the client's
own key) and every match of ``database.redact_patterns`` is replaced with ``[redacted]``. A
streamed answer's body is not kept (only its request's).
"""

from __future__ import annotations

import re

import orjson
import sqlalchemy as sa

from app.store.schema import requests
from app.store.spend import iso
from app.upstream.secrets import REDACTED
_REDACTED = REDACTED.encode()
# A row as the request path builds it and the writer inserts it: a tuple in this order (cheaper
# to build and to hand to the driver than a dict, which matters on the request path).
COLUMNS = ("at", "request_id", "key_id", "endpoint", "model", "served_model", "provider",
           "stream", "attempts", "status", "cache", "prompt_tokens", "completion_tokens",
           "cached_tokens", "cost_usd", "latency_ms", "overhead_ms", "condensed", "error_code",
           "request_body", "response_body")
KEY_ID, MODEL, PROMPT, COMPLETION, CACHED, COST = (COLUMNS.index(c) for c in (
    "key_id", "model", "prompt_tokens", "completion_tokens", "cached_tokens", "cost_usd"))
MAX_PAGE = 1000
EXPORT_PAGE = 1000
_COLUMNS = [c for c in requests.c if c.name not in ("request_body", "response_body")]
_NAMES = [str(c.name) for c in _COLUMNS]  # plain str: orjson takes no str subclass as a key


class Redactor:
    """What a kept body goes through: secrets and patterns blanked, then truncated."""

    def __init__(self, secrets, patterns=(), max_bytes=16 * 1024):
        self.secrets = secrets  # app.upstream.secrets.Secrets
        self.patterns = [re.compile(p.encode()) for p in patterns]
        self.max_bytes = max_bytes

    def text(self, body: bytes | None, client_key: str) -> str | None:
        if not body:
            return None
        body = self.secrets.for_key(client_key).scrub(bytes(body))
        for pattern in self.patterns:
            body = pattern.sub(_REDACTED, body)
        if len(body) > self.max_bytes:
            body = body[:self.max_bytes] + b"...[truncated]"
        return body.decode("utf-8", "replace").replace("\x00", "")  # PostgreSQL takes no NUL


def usage_counts(usage) -> tuple[int, int, int]:
    """(prompt, completion, cached) tokens of an OpenAI-shaped usage."""
    if not isinstance(usage, dict):
        return 0, 0, 0
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else 0
    return tuple(v if type(v) is int and v > 0 else 0 for v in (
        usage.get("prompt_tokens"), usage.get("completion_tokens"), cached))


def to_json(row) -> dict:
    out = {name: getattr(row, name) for name in _NAMES}
    out["time"] = iso(out.pop("at"))
    out["cursor"] = str(out.pop("id"))
    for name in ("request_body", "response_body"):
        if name in row._fields:
            out[name] = getattr(row, name)
    return out


def _filtered(query, *, key_id=None, model=None, status=None, since=None, until=None):
    if key_id is not None:
        query = query.where(requests.c.key_id == key_id)
    if model is not None:
        query = query.where(requests.c.model == model)
    if status is not None:
        low, high = status
        query = query.where(requests.c.status.between(low, high))
    if since is not None:
        query = query.where(requests.c.at >= since)
    if until is not None:
        query = query.where(requests.c.at < until)
    return query


def page(connection, *, limit=100, cursor=None, **filters) -> dict:
    """Newest first; ``cursor``: the last row of the previous page (its ``cursor`` field)."""
    query = _filtered(sa.select(*_COLUMNS), **filters).order_by(requests.c.id.desc())
    if cursor is not None:
        query = query.where(requests.c.id < cursor)
    rows = list(connection.execute(query.limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    return {"data": [to_json(r) for r in rows],
            "next_cursor": str(rows[-1].id) if more else None}


def one(connection, request_id: str):
    """The newest row of ``request_id`` (ids sent by clients may repeat), bodies included."""
    return connection.execute(sa.select(requests).where(requests.c.request_id == request_id)
                              .order_by(requests.c.id.desc()).limit(1)).first()


def export(engine, **filters):
    """Every matching row, oldest first, as NDJSON lines; read a page at a time, so an export
    of millions of rows holds one page in memory and no transaction open between pages."""
    after = 0
    while True:
        with engine.connect() as connection:
            rows = list(connection.execute(
                _filtered(sa.select(*_COLUMNS), **filters).where(requests.c.id > after)
                .order_by(requests.c.id).limit(EXPORT_PAGE)))
        for row in rows:
            yield orjson.dumps(to_json(row)) + b"\n"
        if len(rows) < EXPORT_PAGE:
            return
        after = rows[-1].id


def delete_before(connection, before: float) -> int:
    """Retention: the rows older than ``before`` go."""
    return connection.execute(requests.delete().where(requests.c.at < before)).rowcount
