"""The console's requests pages: the request log (app/store/request_log.py) filtered by key,
model, status and time from the page's query, a page at a time, and one request's row."""

from __future__ import annotations

import re

from app.console import figures as fmt
from app.errors import InvalidRequest
from app.store.keys import parse_time

PAGE_SIZE = 50
MAX_TEXT = 200
_KEY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")  # as app/api accepts X-Request-ID
_STATUS_CLASS = re.compile(r"^[1-5]xx$")
_LOCAL_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2})?$")  # <input datetime-local>
_SECONDS = re.compile(r"^[0-9]{1,12}(\.[0-9]{1,6})?$")
FILTERS = ("key_id", "model", "status", "since", "until")


def _bad(name, message) -> InvalidRequest:
    return InvalidRequest(f"{name.replace('_', ' ')}: {message}.", param=name,
                          code="invalid_value")


def filters(args) -> tuple[dict, dict, int | None]:
    """(the store's filters, the form's values as sent, the cursor) from the page's query;
    InvalidRequest naming the first bad one. Other parameters are ignored."""
    form = {name: (args.get(name) or "").strip() for name in FILTERS}
    query: dict = {}
    if key_id := form["key_id"]:
        if not _KEY_ID.match(key_id):
            raise _bad("key_id", "a key id is 1-64 letters, digits, '.', '_' or '-'")
        query["key_id"] = key_id
    if model := form["model"]:
        if len(model) > MAX_TEXT or not model.isprintable():
            raise _bad("model", f"at most {MAX_TEXT} printable characters")
        query["model"] = model
    if status := form["status"]:
        if status.isascii() and status.isdigit() and 100 <= int(status) <= 599:
            query["status"] = (int(status), int(status))
        elif _STATUS_CLASS.match(status):
            low = int(status[0]) * 100
            query["status"] = (low, low + 99)
        else:
            raise _bad("status", "an HTTP status (429) or a class (5xx)")
    for name in ("since", "until"):
        if raw := form[name]:
            query[name] = _time(name, raw)
    cursor = args.get("cursor")
    if cursor is not None and cursor != "":
        if not (cursor.isascii() and cursor.isdigit() and len(cursor) < 19):
            raise _bad("cursor", "not one this page made")
        cursor = int(cursor)
    else:
        cursor = None
    return query, form, cursor


def _time(name: str, raw: str) -> float:
    """The form's UTC time (2030-03-17T10:00), an ISO 8601 time with its zone, or UNIX
    seconds."""
    if _LOCAL_TIME.match(raw):
        raw += "Z"
    value: object = float(raw) if _SECONDS.match(raw) else raw[:64]
    try:
        return parse_time(value, name)
    except InvalidRequest:
        raise _bad(name, "a time: 2030-03-17T10:00 (UTC), ISO 8601 with its zone, or UNIX "
                         "seconds") from None


def page(p, query: dict, cursor: int | None) -> dict:
    """One page of the log, newest first (``StoreUnavailable`` when the database is down)."""
    store = p.store
    with store.guarded():
        found = store.requests_page(limit=PAGE_SIZE, cursor=cursor, **query)
    rows = [row_text(r) for r in found["data"]]
    return {"rows": rows, "next_cursor": found["next_cursor"]}


def row_text(r: dict) -> dict:
    """A row of the log as the page writes it."""
    tokens = (r.get("prompt_tokens") or 0) + (r.get("completion_tokens") or 0)
    return {**r, "time_text": fmt.iso_text(r.get("time")), "tokens": fmt.count(tokens),
            "cost": fmt.usd(r.get("cost_usd")), "latency": fmt.ms(r.get("latency_ms")),
            "overhead": fmt.ms(r.get("overhead_ms")),
            "linkable": bool(REQUEST_ID.match(r.get("request_id") or ""))}


def one(p, request_id: str) -> dict | None:
    """One request's row, bodies included (as the log keeps them: redacted, truncated)."""
    store = p.store
    with store.guarded():
        found = store.request(request_id)
    return None if found is None else row_text(found)
