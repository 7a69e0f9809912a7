"""``/admin/spend`` and ``/admin/requests``: what keys spent and the request log, answered from
the database (app/store/), with the admin key. This process's queued rows are written before
each read (a second at most); other processes' reach it within their flush interval."""

from __future__ import annotations

import re
from datetime import date

from flask import Blueprint, Response, request

from app.api.admin import require_admin_key
from app.api.keys import reply, store
from app.errors import InvalidRequest, NotFound
from app.store.keys import parse_time
from app.store.request_log import MAX_PAGE
from app.store.spend import GROUPS

bp = Blueprint("usage", __name__, url_prefix="/admin")
bp.before_request(require_admin_key)
_STATUS_CLASS = re.compile(r"^[1-5]xx$")


def _known(allowed):
    for name in request.args:
        if name not in allowed:
            raise InvalidRequest(f"Unknown parameter {name!r} (known: {', '.join(allowed)}).",
                                 param=name, code="unknown_parameter")


def _day(name):
    value = request.args.get(name)
    if value is None:
        return None
    try:
        return date.fromisoformat(value).isoformat()
    except ValueError:
        raise InvalidRequest(f"{name} must be a day, YYYY-MM-DD.", param=name,
                             code="invalid_value") from None


@bp.get("/spend")
def spend():
    _known(("key_id", "model", "from", "to", "group_by"))
    group_by = request.args.get("group_by", "day")
    if group_by not in GROUPS:
        raise InvalidRequest("group_by must be day, model or key.", param="group_by",
                             code="invalid_value")
    s = store()
    with s.guarded():
        return reply(s.spend_report(key_id=request.args.get("key_id"),
                                    model=request.args.get("model"), start=_day("from"),
                                    end=_day("to"), group_by=group_by))


def _filters() -> dict:
    status = request.args.get("status")
    if status is None:
        span = None
    elif status.isdigit() and 100 <= int(status) <= 599:
        span = (int(status), int(status))
    elif _STATUS_CLASS.match(status):
        span = (int(status[0]) * 100, int(status[0]) * 100 + 99)
    else:
        raise InvalidRequest("status must be an HTTP status (429) or a class (5xx).",
                             param="status", code="invalid_value")
    times = {}
    for name in ("since", "until"):
        if name in request.args:
            try:
                times[name] = parse_time(request.args[name], name)
            except InvalidRequest:
                raw = request.args[name]  # UNIX seconds come as text in a query
                try:
                    times[name] = parse_time(float(raw), name)
                except (ValueError, InvalidRequest):
                    raise InvalidRequest(f"{name} must be an ISO 8601 time with its zone or "
                                         "UNIX seconds.", param=name,
                                         code="invalid_value") from None
    return {"key_id": request.args.get("key_id"), "model": request.args.get("model"),
            "status": span, **times}


@bp.get("/requests")
def requests_page():
    """Newest first, ``limit`` at a time (``next_cursor`` for the next page); ``format=ndjson``:
    every matching row, oldest first, one JSON object a line."""
    _known(("key_id", "model", "status", "since", "until", "limit", "cursor", "format"))
    filters = _filters()
    s = store()
    fmt = request.args.get("format", "json")
    if fmt == "ndjson":
        if "limit" in request.args or "cursor" in request.args:
            raise InvalidRequest("format=ndjson exports every matching row: no limit or cursor.",
                                 param="format", code="invalid_value")
        rows = s.requests_export(**filters)
        with s.guarded():  # the first page: a database that is down is a 503, not a cut body
            first = next(rows, b"")

        def lines():
            yield first
            try:
                yield from rows
            except Exception:  # noqa: BLE001 - the status is sent: end the body short
                return
        return Response(lines(), mimetype="application/x-ndjson", headers={
            "Content-Disposition": "attachment; filename=requests.ndjson"})
    if fmt != "json":
        raise InvalidRequest("format must be json or ndjson.", param="format",
                             code="invalid_value")
    limit, cursor = request.args.get("limit", "100"), request.args.get("cursor")
    if not limit.isdigit() or not 1 <= int(limit) <= MAX_PAGE:
        raise InvalidRequest(f"limit must be a whole number from 1 to {MAX_PAGE}.",
                             param="limit", code="invalid_value")
    if cursor is not None and not (cursor.isdigit() and len(cursor) < 19):
        raise InvalidRequest("cursor must be a next_cursor this endpoint returned.",
                             param="cursor", code="invalid_value")
    with s.guarded():
        return reply(s.requests_page(limit=int(limit), cursor=None if cursor is None
                                     else int(cursor), **filters))


@bp.get("/requests/<request_id>")
def one_request(request_id):
    s = store()
    with s.guarded():
        found = s.request(request_id)
    if found is None:
        raise NotFound(f"No request {request_id!r} in the request log.",
                       code="request_not_found")
    return reply(found)
