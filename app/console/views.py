"""The console's routes: sign-in and sign-out, the pages and their JSON views, and the
actions (a breaker reset, a cache cleared, keys created, rotated and revoked).

Every route but the sign-in page and the static files needs a session. Every POST needs the
session's CSRF token in its form and must come from this origin (``Sec-Fetch-Site``, or
``Origin`` from browsers that send no ``Sec-Fetch-Site``). Every response under ``/console``
gets the security headers (``security_headers``), errors and redirects included.
"""

from __future__ import annotations

import logging
import math
import re
from urllib.parse import urlsplit

import orjson
from flask import (Blueprint, Response, current_app, g, redirect, render_template, request,
                   url_for)
from werkzeug.exceptions import HTTPException

from app.auth import is_admin_key
from app.console import EXTENSION
from app.console import keys as keys_page
from app.console import pages, request_log
from app.console.figures import Figures
from app.console.session import COOKIE, COOKIE_PATH
from app.errors import NotFound, ProxyError

log = logging.getLogger("llm_proxy.console")

bp = Blueprint("console", __name__, url_prefix="/console", template_folder="templates",
               static_folder="static", static_url_path="/static")

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
OPEN = frozenset({"console.sign_in", "console.sign_in_post"})
MAX_KEY = 4096  # characters of a presented admin key looked at
_KEY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# After sign-in: /console, a path of plain segments under it, and a query (no fragment).
_NEXT = re.compile(r"^/console(/[A-Za-z0-9._~-]+)*/?(\?[A-Za-z0-9._~=&%+:,-]*)?$")
DONE = {  # ?done= after an action: fixed messages, so a link cannot make the page say more
    "reset": "Breaker reset.",
    "reset-all": "Every breaker reset.",
    "cleared-response": "The response cache was cleared.",
    "cleared-summary": "The summary cache was cleared.",
    "cleared-all": "Both caches were cleared.",
    "revoked": "Key revoked: it is refused from now on (every process within "
               "database.refresh_interval, at once with Redis).",
}


def console():
    return current_app.extensions[EXTENSION]


def proxy():
    return current_app.extensions["llm_proxy"]


def security_headers(response):
    """On every response under /console (the app's after_request: 404s, 405s and redirects
    of the router included): the strict CSP and friends; no caching but of static files."""
    path = request.path
    if path != "/console" and not path.startswith("/console/"):
        return response
    response.headers.update(SECURITY_HEADERS)
    response.headers["Cache-Control"] = ("no-cache" if request.endpoint == "console.static"
                                         else "no-store")
    return response


# -- sessions, CSRF, errors -------------------------------------------------------------------

@bp.before_request
def require_session():
    if request.endpoint == "console.static":
        return None  # the stylesheet and script: public, and no session read for them
    c = console()
    g.console_session = (c.sessions.read(request.cookies.get(COOKIE))
                         if c.sessions is not None else None)
    if request.endpoint in OPEN:
        return None
    if g.console_session is None:
        if request.path.endswith(".json"):
            return _json({"error": "signed_out", "sign_in": url_for("console.sign_in")}, 401)
        if request.method in ("GET", "HEAD"):
            here = request.path + (f"?{request.query_string.decode('latin-1')}"
                                   if request.query_string else "")
            return redirect(url_for("console.sign_in", next=here), 303)
        return redirect(url_for("console.sign_in"), 303)
    if request.method == "POST":
        if not same_origin():
            return refused("This form was sent from another site, so it was not acted on.")
        if not c.sessions.csrf_ok(g.console_session, request.form.get("csrf_token")):
            return refused("This form's security token is missing or out of date (a sign-in "
                           "since the page was loaded?). Load the page again and resend.")
    return None


def same_origin() -> bool:
    """Whether a POST came from a page of this origin, as far as the browser says: its
    ``Sec-Fetch-Site`` when sent (every current browser), else its ``Origin`` when sent
    (compared by host: a TLS-terminating proxy in front changes the scheme), else yes (a
    client that is no browser; the CSRF token still decides)."""
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None:
        return site == "same-origin"
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    try:
        return origin != "null" and urlsplit(origin).netloc == request.host
    except ValueError:
        return False


@bp.context_processor
def _context():
    session = g.get("console_session")
    return {"csrf": session.csrf if session is not None else "",
            "signed_in": session is not None}


def refused(message: str, status: int = 403):
    return render("error.html", status=status, title="Refused", message=message)


@bp.errorhandler(ProxyError)
def _proxy_error(error: ProxyError):
    response = render("error.html", status=error.status, title="Not done",
                      message=error.message)
    response.headers.update(error.headers)
    return response


@bp.errorhandler(HTTPException)
def _http_error(error: HTTPException):
    return render("error.html", status=error.code or 500, title=error.name or "Error",
                  message=error.description or "")


def render(template: str, *, status: int = 200, **context) -> Response:
    context.setdefault("figures", Figures())
    context.setdefault("page", "")
    html = render_template(f"console/{template}", refresh=console().refresh_seconds,
                           **context)
    return Response(html, status=status, mimetype="text/html")


def _json(body, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status=status, mimetype="application/json")


def _done() -> str | None:
    return DONE.get(request.args.get("done", ""))


# -- sign-in and sign-out ---------------------------------------------------------------------

def safe_next(value: str | None) -> str:
    """Where to go after signing in: a path of the console, else the overview (no open
    redirect: never another host, scheme or a protocol-relative //host)."""
    fallback = url_for("console.overview")
    if not value or len(value) > 2048 or not _NEXT.match(value):
        return fallback
    path = value.partition("?")[0]
    if any(segment in (".", "..") for segment in path.split("/")):
        return fallback  # /console/../admin would leave the console
    return value


def sign_in_page(*, status: int = 200, error: str | None = None, next_url: str = ""):
    return render("sign_in.html", status=status, title="Sign in", error=error,
                  next_url=safe_next(next_url),
                  admin_key_set=bool(proxy().settings.admin_api_key))


@bp.get("/sign-in")
def sign_in():
    if g.console_session is not None:
        return redirect(safe_next(request.args.get("next")), 303)
    return sign_in_page(next_url=request.args.get("next", ""))


@bp.post("/sign-in")
def sign_in_post():
    c = console()
    next_url = request.form.get("next", "")
    if not same_origin():
        return refused("This sign-in was sent from another site.")
    if c.sessions is None:
        return sign_in_page(status=403, error="No admin key is set: nobody can sign in.")
    address = request.remote_addr or "-"
    wait = c.throttle.retry_after(address)
    if wait:
        log.warning("console: sign-in from %s refused: too many wrong admin keys", address)
        response = sign_in_page(status=429, next_url=next_url, error=(
            f"Too many wrong keys from your address: try again in {math.ceil(wait)} s."))
        response.headers["Retry-After"] = str(math.ceil(wait))
        return response
    given = request.form.get("admin_key", "")
    if len(given) > MAX_KEY or not is_admin_key(given, proxy().settings.admin_api_key):
        c.throttle.wrong(address)
        log.warning("console: a wrong admin key from %s", address)
        return sign_in_page(status=401, next_url=next_url, error="That is not the admin key.")
    _, cookie = c.sessions.make()
    response = redirect(safe_next(next_url), 303)
    # Secure when the request came over https as the WSGI server saw it: waitress strips
    # X-Forwarded-Proto unless its trusted_proxy names the sender (docs/console.md).
    response.set_cookie(COOKIE, cookie, max_age=c.sessions.max_age, path=COOKIE_PATH,
                        secure=request.is_secure, httponly=True, samesite="Strict")
    log.warning("console: signed in from %s", address)
    return response


@bp.post("/sign-out")
def sign_out():
    console().sessions.sign_out(g.console_session)
    response = redirect(url_for("console.sign_in"), 303)
    response.delete_cookie(COOKIE, path=COOKIE_PATH, secure=request.is_secure, httponly=True,
                           samesite="Strict")
    return response


# -- overview, providers, cache ---------------------------------------------------------------

@bp.get("/", strict_slashes=False)
def overview():
    data = pages.overview(proxy())
    return render("overview.html", page="overview", title="Overview",
                  json_url=url_for("console.overview_json"), **data)


@bp.get("/overview.json")
def overview_json():
    return _json(pages.overview(proxy())["figures"].to_json())


@bp.get("/providers")
def providers():
    data = pages.providers(proxy())
    return render("providers.html", page="providers", title="Providers",
                  json_url=url_for("console.providers_json"), notice=_done(), **data)


@bp.get("/providers.json")
def providers_json():
    return _json(pages.providers(proxy())["figures"].to_json())


@bp.post("/providers/reset")
def reset_breaker():
    """Close a provider's breaker and its models' (``name``), or every breaker (no name): as
    ``POST /debug/circuit-breakers/reset``."""
    breakers = proxy().breakers
    name = request.form.get("name") or None
    if name is not None and name not in breakers:
        raise NotFound(f"No provider named {name[:100]!r}.")
    breakers.reset(name)
    log.warning("console: %s reset by %s", f"breaker {name!r}" if name else "every breaker",
                request.remote_addr or "-")
    return redirect(url_for("console.providers", done="reset" if name else "reset-all"), 303)


@bp.get("/cache")
def cache():
    data = pages.cache(proxy())
    return render("cache.html", page="cache", title="Cache",
                  json_url=url_for("console.cache_json"), notice=_done(), **data)


@bp.get("/cache.json")
def cache_json():
    return _json(pages.cache(proxy())["figures"].to_json())


@bp.post("/cache/clear")
def clear_cache():
    """Empty the cache ``name`` (response or summary) or both (all): as
    ``POST /debug/cache/clear``."""
    name = request.form.get("name", "all")
    if name not in ("response", "summary", "all"):
        raise NotFound("No such cache: use response, summary or all.")
    proxy().caches.clear(None if name == "all" else name)
    log.warning("console: %s cache cleared by %s", name, request.remote_addr or "-")
    return redirect(url_for("console.cache", done=f"cleared-{name}"), 303)


# -- keys -------------------------------------------------------------------------------------

def _keys_args() -> dict:
    page = request.args.get("page", "1")
    return {"revoked": request.args.get("revoked") in ("1", "true"),
            "page": int(page) if page.isascii() and page.isdigit() and len(page) < 6 else 1}


def keys_view(*, status: int = 200, created=None, error=None, notice=None, form=None):
    args = _keys_args()
    data = keys_page.keys_page(proxy(), **args)
    shown = {"page": data["page_number"], **({"revoked": "1"} if args["revoked"] else {})}
    return render("keys.html", status=status, page="keys", title="Keys",
                  json_url=url_for("console.keys_json", **shown), created=created,
                  error=error, notice=notice, form=form or {}, **data)


@bp.get("/keys")
def keys():
    notice = _done()
    revoked = request.args.get("key", "")
    if notice and _KEY_ID.match(revoked):
        notice = f"{revoked}: {notice}"
    return keys_view(notice=notice)


@bp.get("/keys.json")
def keys_json():
    return _json(keys_page.keys_page(proxy(), **_keys_args())["figures"].to_json())


def _key_id(key_id: str) -> str:
    if not _KEY_ID.match(key_id):
        raise NotFound("No such key.")
    return key_id


@bp.post("/keys")
def create_key():
    actor = keys_page.actor(request.remote_addr)
    try:
        secret, key = keys_page.create(proxy(), request.form, actor)
    except ProxyError as e:
        form = {k: request.form.get(k, "")[:keys_page.MAX_FIELD] for k in request.form
                if k != "csrf_token"}
        return keys_view(status=e.status, error=e.message, form=form)
    log.warning("console: key %s created by %s", key["id"], actor)
    return keys_view(created={"id": key["id"], "secret": secret, "action": "created"})


@bp.post("/keys/<key_id>/rotate")
def rotate_key(key_id):
    actor = keys_page.actor(request.remote_addr)
    try:
        secret, key = keys_page.rotate(proxy(), _key_id(key_id), request.form, actor)
    except ProxyError as e:
        return keys_view(status=e.status, error=e.message)
    log.warning("console: key %s rotated by %s", key["id"], actor)
    return keys_view(created={"id": key["id"], "secret": secret, "action": "rotated",
                              "previous_until": key["previous_secret_valid_until"]})


@bp.post("/keys/<key_id>/revoke")
def revoke_key(key_id):
    actor = keys_page.actor(request.remote_addr)
    try:
        key = keys_page.revoke(proxy(), _key_id(key_id), actor)
    except ProxyError as e:
        return keys_view(status=e.status, error=e.message)
    log.warning("console: key %s revoked by %s", key["id"], actor)
    return redirect(url_for("console.keys", done="revoked", key=key["id"]), 303)


# -- requests ---------------------------------------------------------------------------------

@bp.get("/requests")
def requests_page():
    p = proxy()
    query, form, cursor = {}, {name: "" for name in request_log.FILTERS}, None
    error, found, status = None, None, 200
    try:
        query, form, cursor = request_log.filters(request.args)
        if p.store is not None:
            found = request_log.page(p, query, cursor)
    except ProxyError as e:
        error, status = e.message, e.status
    shown = {k: v for k, v in form.items() if v}
    older = None
    if found and found["next_cursor"]:
        older = url_for("console.requests_page", cursor=found["next_cursor"], **shown)
    return render("requests.html", status=status, page="requests", title="Requests",
                  database=p.store is not None, form=form, error=error, found=found,
                  older=older, newest=url_for("console.requests_page", **shown),
                  filtered=bool(shown), paged=cursor is not None)


@bp.get("/requests/<request_id>")
def one_request(request_id):
    p = proxy()
    if p.store is None:
        raise NotFound("The database is off (DATABASE_ENABLED=false): there is no request log.")
    row = request_log.one(p, request_id) if request_log.REQUEST_ID.match(request_id) else None
    if row is None:
        raise NotFound("No such request in the request log.")
    return render("request.html", page="requests", title=f"Request {request_id}", row=row)


@bp.route("/<path:anything>", methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"])
def unknown(anything):
    """Anything else under /console: a page of the console's, not the API's JSON 404."""
    raise NotFound("There is no such page in the console.")
