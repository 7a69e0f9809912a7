"""The operator console at /console: served only when it should be, signed in with the admin
key (a signed, strict session cookie; wrong keys throttled), CSRF and origin checks on every
action, the security headers, each page's figures and actions, hostile input, secrets kept off
pages and logs, and every page fast on a live server."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlencode

import pytest
import requests

from app import create_app
from app.console.session import SignInThrottle
from app.console.views import CSP
from tests.conftest import FakeClock, live_server, provider, settings_of
from tests.databases import sqlite_environ, sqlite_section
from tests.processes import free_port, stop, wait_for
from tests.store_helpers import wait_until
from tests.upstream import Reply

REPO = Path(__file__).resolve().parent.parent
ADMIN = "console-admin-key-0123456789abcdef"
CONFIG_SECRET = "sk-config-console-0123456789abcdef"
MOCK = {"name": "mock", "type": "mock", "models": ["mock-model"]}
WALL = 1_900_000_020.0  # 2030-03-17, far from today: a time taken from the real clock shows
CHAT = {"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]}
PAGES = ("/console/", "/console/providers", "/console/keys", "/console/requests",
         "/console/cache")
JSON_VIEWS = ("/console/overview.json", "/console/providers.json", "/console/keys.json",
              "/console/cache.json")


@pytest.fixture
def console_app():
    """Build an app with the console (the admin key set unless said otherwise) from setting
    sections; ``clock`` (intervals: the sign-in throttle) and ``wall`` (the session and the
    timeline) injectable. Closed after the test."""
    made = []

    def make(providers=None, *, clock=None, wall=None, admin_api_key=ADMIN, **sections):
        data = {"providers": providers or [MOCK], "admin_api_key": admin_api_key, **sections}
        options = {k: v for k, v in (("clock", clock), ("wall", wall)) if v is not None}
        app = create_app(settings_of(data), **options)
        app.testing = True
        made.append(app)
        return app

    yield make
    for app in made:
        app.extensions["llm_proxy"].close()


def sign_in(client, key=ADMIN, next_url=None, **options):
    data = {"admin_key": key, **({"next": next_url} if next_url is not None else {})}
    return client.post("/console/sign-in", data=data, **options)


def signed_in(app, **options):
    client = app.test_client(**options)
    response = sign_in(client)
    assert response.status_code == 303, response.get_data(as_text=True)
    return client


def csrf_of(client, path="/console/providers") -> str:
    html = client.get(path).get_data(as_text=True)
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)


def chat(client, body=CHAT, key=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    response = client.post("/v1/chat/completions", json=body, headers=headers)
    response.get_data()
    response.close()  # the request ends: its timeline second and log row are recorded
    return response


def figures(client, view="/console/overview.json") -> dict:
    response = client.get(view)
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()


def cookie_header(response) -> str:
    found = [v for k, v in response.headers.items() if k == "Set-Cookie"
             and v.startswith("llm_proxy_console=")]
    assert len(found) == 1, response.headers
    return found[0]


# -- when it is served ------------------------------------------------------------------------

def test_the_console_is_not_routed_when_off_and_the_timeline_records_nothing(console_app):
    off = console_app(console={"enabled": False})
    assert off.test_client().get("/console/").status_code == 404
    assert off.test_client().get("/console/sign-in").status_code == 404
    assert not off.extensions["llm_proxy"].timeline.enabled
    production = console_app(environment="production", admin_api_key="",
                             auth={"env_keys": f"k:{CONFIG_SECRET}"})
    assert production.test_client().get("/console/sign-in").status_code == 404
    served = console_app(environment="production", auth={"env_keys": f"k:{CONFIG_SECRET}"})
    assert served.test_client().get("/console/sign-in").status_code == 200


def test_without_an_admin_key_in_development_the_sign_in_page_says_how_to_set_one(console_app):
    app = console_app(admin_api_key="")
    client = app.test_client()
    page = client.get("/console/sign-in")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert 'id="no-admin-key"' in html and "ADMIN_API_KEY" in html
    assert 'id="sign-in-form"' not in html
    assert sign_in(client, key="anything").status_code == 403
    assert client.get("/console/providers").status_code == 303  # nobody is signed in


# -- sign-in and the session ------------------------------------------------------------------

def test_pages_send_the_signed_out_to_the_sign_in_page_and_json_views_answer_401(console_app):
    client = console_app().test_client()
    for path in PAGES:
        response = client.get(path)
        assert response.status_code == 303, path
        assert response.headers["Location"].startswith("/console/sign-in?next=")
    for path in JSON_VIEWS:
        response = client.get(path)
        assert response.status_code == 401 and response.get_json()["error"] == "signed_out"
    response = client.post("/console/cache/clear", data={"name": "all"})
    assert response.status_code == 303 and response.headers["Location"] == "/console/sign-in"


def test_the_admin_key_signs_in_with_a_strict_session_cookie_that_holds_no_key(console_app):
    app = console_app(console={"session_hours": 2})
    client = app.test_client()
    response = sign_in(client, next_url="/console/keys?revoked=1")
    assert response.status_code == 303 and response.headers["Location"] == "/console/keys?revoked=1"
    cookie = cookie_header(response)
    attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")[1:]}
    assert {"httponly", "path", "max-age", "samesite", "expires"} <= attributes
    assert "SameSite=Strict" in cookie and "Path=/console;" in cookie + ";"
    assert "Max-Age=7200" in cookie and "secure" not in attributes  # plain http here
    value = cookie.split(";")[0].split("=", 1)[1]
    digest = hashlib.sha256(ADMIN.encode()).hexdigest()
    assert ADMIN not in value and digest not in value and ADMIN[:8] not in value
    assert client.get("/console/providers").status_code == 200
    # Already signed in: the sign-in page goes on to where it was asked to
    assert client.get("/console/sign-in?next=/console/cache").headers["Location"] == \
        "/console/cache"


def test_the_cookie_is_secure_over_https_and_a_forwarded_proto_header_is_not_trusted(
        console_app):
    app = console_app()
    over_https = sign_in(app.test_client(), base_url="https://localhost")
    assert "Secure" in cookie_header(over_https)
    claimed = sign_in(app.test_client(), headers={"X-Forwarded-Proto": "https"})
    assert "Secure" not in cookie_header(claimed)


@pytest.mark.parametrize("next_url", [
    "https://evil.example/", "//evil.example/console", "/\\evil.example", "/console//evil",
    "/console/../admin/keys", "/console/%2e%2e/admin", "/admin/keys", "javascript:alert(1)",
    "/console\r\nSet-Cookie: x=1", "/console/keys#frag", "/console/" + "a" * 3000, "",
])
def test_after_sign_in_only_a_console_path_is_followed(console_app, next_url):
    response = sign_in(console_app().test_client(), next_url=next_url)
    assert response.status_code == 303 and response.headers["Location"] == "/console/"


def test_a_wrong_key_is_refused_and_past_the_limit_every_key_waits_for_the_minute(console_app):
    clock = FakeClock()
    app = console_app(clock=clock, console={"sign_in_attempts": 3})
    client = app.test_client()
    for attempt in range(3):
        response = sign_in(client, key=f"wrong-{attempt}")
        assert response.status_code == 401 and 'id="error"' in response.get_data(as_text=True)
        assert "Set-Cookie" not in response.headers
        clock.advance(1)
    locked = sign_in(client)  # the right key: refused too while locked out
    assert locked.status_code == 429 and "Set-Cookie" not in locked.headers
    assert 55 <= int(locked.headers["Retry-After"]) <= 60
    other = app.test_client()  # another address is not locked out
    assert sign_in(other, environ_base={"REMOTE_ADDR": "10.0.0.2"}).status_code == 303
    clock.advance(58)  # a minute after the first wrong key
    assert sign_in(client).status_code == 303


@pytest.mark.parametrize("body,content_type", [
    ({"admin_key": "x" * 2_000_000}, None),
    ({f"field{i}": "1" for i in range(3000)}, None),
    (b"admin_key=%ff%fe%00&next=%ff", "application/x-www-form-urlencoded"),
    (b"\xff\xfe\x00garbage", "multipart/form-data; boundary=zz"),
], ids=["huge-key", "many-fields", "bad-bytes", "bad-multipart"])
def test_a_hostile_sign_in_is_a_4xx_page_never_a_500(console_app, body, content_type):
    client = console_app().test_client()
    options = {"content_type": content_type} if content_type else {}
    response = client.post("/console/sign-in", data=body, **options)
    assert 400 <= response.status_code < 500 and response.mimetype == "text/html"
    assert "Set-Cookie" not in response.headers


def test_the_throttle_remembers_a_bounded_number_of_addresses_and_splits_over_workers():
    clock = FakeClock()
    throttle = SignInThrottle(5, clock=clock, max_addresses=100)
    for n in range(10_000):
        throttle.wrong(f"10.{n // 65536}.{n // 256 % 256}.{n % 256}")
    assert len(throttle) == 100
    assert SignInThrottle(5, workers=4).attempts == 1
    assert SignInThrottle(5, workers=2).attempts == 2
    assert SignInThrottle(5, workers=8).attempts == 1  # at least one try each


def test_a_session_ends_after_session_hours(console_app):
    wall = FakeClock(WALL)
    app = console_app(wall=wall, console={"session_hours": 1})
    client = signed_in(app)
    wall.advance(3599)
    assert client.get("/console/providers").status_code == 200
    wall.advance(2)
    assert client.get("/console/providers").status_code == 303


def test_workers_sharing_a_secret_share_sessions_and_a_new_admin_key_ends_them(console_app):
    secret = {"session_secret": "shared-secret-of-the-workers-0123456789"}
    a = console_app(console=secret)
    b = console_app(console=secret)
    rotated = console_app(console=secret, admin_api_key="a-new-admin-key-0123456789abcdef")
    other_secret = console_app(console={"session_secret": "another-secret-0123456789abcdef"})
    cookie = cookie_header(sign_in(a.test_client())).split(";")[0].split("=", 1)[1]
    for app, works in ((b, True), (rotated, False), (other_secret, False)):
        client = app.test_client()
        client.set_cookie("llm_proxy_console", cookie, path="/console")
        assert (client.get("/console/providers").status_code == 200) is works


@pytest.mark.parametrize("cookie", ["", "x", "e30.aaaa.bbbb", "A" * 4000,
                                    "eyJpZCI6IngiLCJjc3JmIjoieCJ9.aw9a9A.forged"])
def test_a_forged_malformed_or_huge_cookie_is_no_session(console_app, cookie):
    client = console_app().test_client()
    client.set_cookie("llm_proxy_console", cookie, path="/console")
    assert client.get("/console/providers").status_code == 303


def test_sign_out_ends_the_session_even_for_a_copy_of_its_cookie(console_app):
    app = console_app()
    client = app.test_client()
    cookie = cookie_header(sign_in(client)).split(";")[0].split("=", 1)[1]
    response = client.post("/console/sign-out", data={"csrf_token": csrf_of(client)})
    assert response.status_code == 303 and response.headers["Location"] == "/console/sign-in"
    assert "llm_proxy_console=;" in cookie_header(response)  # the browser drops it
    copy = app.test_client()
    copy.set_cookie("llm_proxy_console", cookie, path="/console")
    assert copy.get("/console/providers").status_code == 303


def test_a_sign_out_reaches_every_process_through_redis(console_app, redis_url, prefix):
    shared = dict(console={"session_secret": "shared-secret-0123456789abcdef"},
                  redis={"url": redis_url, "prefix": prefix})
    a, b = console_app(**shared), console_app(**shared)
    client = a.test_client()
    cookie = cookie_header(sign_in(client)).split(";")[0].split("=", 1)[1]
    other = b.test_client()
    other.set_cookie("llm_proxy_console", cookie, path="/console")
    assert other.get("/console/providers").status_code == 200
    client.post("/console/sign-out", data={"csrf_token": csrf_of(client)})
    assert other.get("/console/providers").status_code == 303


# -- CSRF, origin, headers --------------------------------------------------------------------

ACTIONS = [("/console/providers/reset", {"name": "mock"}), ("/console/cache/clear",
           {"name": "all"}), ("/console/sign-out", {}), ("/console/keys", {"id": "k"}),
           ("/console/keys/k/rotate", {}), ("/console/keys/k/revoke", {})]


@pytest.mark.parametrize("path,form", ACTIONS, ids=[a[0] for a in ACTIONS])
@pytest.mark.parametrize("token", [None, "", "wrong-token"], ids=["none", "empty", "wrong"])
def test_every_action_needs_the_sessions_csrf_token(console_app, path, form, token):
    app = console_app()
    client = signed_in(app)
    data = {**form, **({"csrf_token": token} if token is not None else {})}
    response = client.post(path, data=data)
    assert response.status_code == 403
    html = response.get_data(as_text=True)
    assert 'id="error"' in html and "security token" in html
    assert client.get("/console/providers").status_code == 200  # not signed out either


def test_a_form_sent_from_another_site_is_refused_even_with_the_token(console_app):
    app = console_app(cache={"enabled": True})
    client = signed_in(app)
    token = csrf_of(client)
    chat(client)
    for headers in ({"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"},
                    {"Origin": "https://evil.example"}, {"Origin": "null"}):
        response = client.post("/console/cache/clear", data={"csrf_token": token, "name": "all"},
                               headers=headers)
        assert response.status_code == 403, headers
    assert app.extensions["llm_proxy"].caches.response.stats()["entries"] == 1
    ok = client.post("/console/cache/clear", data={"csrf_token": token, "name": "all"},
                     headers={"Sec-Fetch-Site": "same-origin", "Origin": "http://localhost"})
    assert ok.status_code == 303
    cross = app.test_client().post("/console/sign-in", data={"admin_key": ADMIN},
                                   headers={"Sec-Fetch-Site": "cross-site"})
    assert cross.status_code == 403 and "Set-Cookie" not in cross.headers


def test_every_console_answer_carries_the_security_headers_and_pages_are_not_stored(
        console_app):
    client = signed_in(console_app())
    answers = {path: client.get(path) for path in (*PAGES, *JSON_VIEWS, "/console/nope",
                                                   "/console/requests/x",
                                                   "/console/static/console.css",
                                                   "/console/static/console.js",
                                                   "/console/static/missing.js",
                                                   "/console/sign-in", "/console")}
    answers["DELETE /console/keys"] = client.delete("/console/keys")
    answers["POST /console"] = client.post("/console")
    answers["signed out"] = console_app().test_client().get("/console/keys")
    for name, response in answers.items():
        headers = response.headers
        assert headers["Content-Security-Policy"] == CSP, name
        assert headers["X-Content-Type-Options"] == "nosniff", name
        assert headers["Referrer-Policy"] == "no-referrer", name
        assert headers["X-Frame-Options"] == "DENY", name
        static = name.startswith("/console/static/")
        assert headers["Cache-Control"] == ("no-cache" if static else "no-store"), name
    assert answers["/console/nope"].status_code == 404
    assert answers["/console/nope"].mimetype == "text/html"
    assert answers["/console/static/console.js"].mimetype == "text/javascript"
    assert "default-src 'none'" in CSP and "frame-ancestors 'none'" in CSP
    # the rest of the proxy is untouched
    assert "Content-Security-Policy" not in client.get("/health").headers


def test_pages_have_no_inline_script_style_or_handler_and_name_no_other_host(
        console_app, tmp_path):
    app = console_app(database=sqlite_section(tmp_path / "proxy.db"))
    client = signed_in(app)
    chat(client)
    pages = [client.get(p).get_data(as_text=True) for p in PAGES]
    pages.append(app.test_client().get("/console/sign-in").get_data(as_text=True))
    for html in pages:
        assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), "an inline script"
        assert "<style" not in html and not re.search(r"\sstyle=", html)
        assert not re.search(r"\son[a-z]+\s*=", html), "an inline event handler"
        assert not re.search(r"(src|href|action)=\"(https?:)?//", html), "another host"
        assert "javascript:" not in html


# -- the overview and the timeline ------------------------------------------------------------

def test_the_overview_shows_the_hours_requests_errors_latency_cache_and_memory(
        console_app, upstream):
    wall = FakeClock(WALL)
    app = console_app([provider(upstream.url, "up", models=["gpt-test"])], wall=wall,
                      cache={"enabled": True}, http_client={"retry_attempts": 0})
    client = signed_in(app)
    body = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}
    assert chat(client, body).status_code == 200
    assert chat(client, body).headers["X-Cache"] == "HIT"
    upstream.script(Reply(500))
    assert chat(client, {**body, "messages": [{"role": "user", "content": "other"}]}) \
        .status_code >= 500
    client.get("/health")  # probes, metrics and the console itself are not counted
    client.get("/metrics")
    wall.advance(5)
    view = figures(client)
    fields = view["fields"]
    assert fields["requests_hour"] == "3" and fields["errors_hour"] == "1"
    assert fields["error_rate"] == "33.3%" and fields["refused_hour"] == "0"
    assert fields["cache_hit_rate"] == "33.3%"  # one HIT of three lookups
    assert fields["latency_p50"].endswith(("ms", "s")) and fields["overhead_p99"] != "\u2013"
    assert fields["scope"] == "this process"
    assert fields["pressure"] == "normal" and fields["rss"].endswith("MB")
    assert fields["tokens_today"] != "\u2013" and "this process" in fields["today_source"]
    assert fields["updated"] == "2030-03-17 17:47:05Z"
    for chart in ("requests-requests", "requests-errors", "errors-error_rate",
                  "latency-p50", "latency-p99", "overhead-p50", "overhead-p99"):
        assert view["paths"][f"chart-{chart}"].startswith("M"), chart
    html = client.get("/console/").get_data(as_text=True)
    for name, text in fields.items():  # the page and its JSON view agree
        assert f'id="f-{name}" data-field="{name}"' in html, name
    assert 'data-source="/console/overview.json"' in html and 'data-refresh="5' in html
    assert html.count("<svg") == 4 and 'data-path="chart-latency-p99"' in html


def test_the_overview_merges_every_processs_requests_through_redis(
        console_app, redis_url, prefix):
    wall = FakeClock(WALL)
    shared = dict(wall=wall, redis={"url": redis_url, "prefix": prefix})
    a, b = console_app(**shared), console_app(**shared)
    client = signed_in(a)
    chat(client)
    chat(b.test_client())
    chat(b.test_client())
    for app in (a, b):
        app.extensions["llm_proxy"].timeline.exchange.publish()
    wall.advance(3)
    fields = figures(client)["fields"]
    assert fields["requests_hour"] == "3"
    assert fields["scope"] == "2 processes (through Redis)"
    assert "2 processes through Redis" in fields["today_source"]


def test_the_overview_says_when_redis_does_not_answer(console_app):
    app = console_app(redis={"url": "redis://127.0.0.1:1/0", "prefix": "llmproxy-test-away:"})
    client = signed_in(app)
    chat(client)
    fields = figures(client)["fields"]
    assert fields["requests_hour"] == "1"
    assert fields["scope"] == "this process only: Redis did not answer"


def test_with_workers_and_no_redis_the_overview_says_it_shows_one_worker(console_app):
    app = console_app(server={"workers": 2, "worker_index": 1})
    fields = figures(signed_in(app))["fields"]
    assert fields["scope"].startswith("this worker only (1 of 2)")


# -- providers --------------------------------------------------------------------------------

def test_the_providers_page_shows_an_open_breaker_and_its_button_closes_it(
        console_app, upstream):
    app = console_app([provider(upstream.url, "up.stream/1", models=["gpt-test"])],
                      circuit_breaker={"failure_threshold": 1, "adaptive_thresholds": False},
                      http_client={"retry_attempts": 0})
    client = signed_in(app)
    upstream.script(Reply(500))
    chat(client, {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]})
    view = figures(client, "/console/providers.json")
    slug = "up.stream_1"  # the name's "/" is not safe in an element id
    assert view["states"][f"provider-{slug}-state"] == "open"
    assert view["fields"][f"provider-{slug}-failures"] == "1 of 1"
    assert view["fields"][f"provider-{slug}-in_flight"].startswith("0 of ")
    html = client.get("/console/providers").get_data(as_text=True)
    assert f'id="reset-{slug}"' in html and 'data-name="up.stream/1"' in html
    response = client.post("/console/providers/reset",
                           data={"csrf_token": csrf_of(client), "name": "up.stream/1"})
    assert response.status_code == 303
    assert response.headers["Location"] == "/console/providers?done=reset"
    assert app.extensions["llm_proxy"].breakers.get("up.stream/1").state == "closed"
    assert 'id="notice"' in client.get(response.headers["Location"]).get_data(as_text=True)
    unknown = client.post("/console/providers/reset",
                          data={"csrf_token": csrf_of(client), "name": "<nope>"})
    assert unknown.status_code == 404 and "&lt;nope&gt;" in unknown.get_data(as_text=True)
    every = client.post("/console/providers/reset", data={"csrf_token": csrf_of(client)})
    assert every.headers["Location"] == "/console/providers?done=reset-all"


# -- cache ------------------------------------------------------------------------------------

def test_the_cache_page_shows_entries_bytes_and_hit_rate_and_clears_one_or_both(console_app):
    app = console_app(cache={"enabled": True})
    client = signed_in(app)
    chat(client)
    chat(client)
    view = figures(client, "/console/cache.json")["fields"]
    assert view["cache-response-entries"].startswith("1 of ")
    assert view["cache-response-hit_rate"] == "50.0%" and view["cache-response-hits"] == "1"
    assert " of " in view["cache-response-bytes"]
    token = csrf_of(client, "/console/cache")
    response = client.post("/console/cache/clear", data={"csrf_token": token, "name": "summary"})
    assert response.headers["Location"] == "/console/cache?done=cleared-summary"
    assert app.extensions["llm_proxy"].caches.response.stats()["entries"] == 1
    client.post("/console/cache/clear", data={"csrf_token": token, "name": "response"})
    assert app.extensions["llm_proxy"].caches.response.stats()["entries"] == 0
    bad = client.post("/console/cache/clear", data={"csrf_token": token, "name": "everything"})
    assert bad.status_code == 404
    page = client.get("/console/cache?done=cleared-all").get_data(as_text=True)
    assert 'id="clear-response"' in page and "Both caches were cleared." in page
    forged = client.get("/console/cache?done=<b>owned</b>").get_data(as_text=True)
    assert "owned" not in forged  # only fixed messages


# -- keys -------------------------------------------------------------------------------------

def key_app(console_app, database, **sections):
    """An app on ``database`` with one key of the configuration, ``cfg-key``."""
    sections.setdefault("observability", {"access_log": False})
    return console_app(database=database, auth={"env_keys": f"cfg-key:{CONFIG_SECRET}"},
                       **sections)


def test_keys_are_created_rotated_and_revoked_from_the_console_and_audited(
        console_app, database):
    app = key_app(console_app, database)
    client = signed_in(app)
    token = csrf_of(client, "/console/keys")
    created = client.post("/console/keys", data={
        "csrf_token": token, "id": "team-a", "owner": "Ops <ops@example.com>", "team": "ops",
        "models": "mock-model, gpt-*", "requests_per_minute": "10", "daily_usd": "2.5",
        "expires_at": "2031-01-01T00:00"})
    html = created.get_data(as_text=True)
    assert created.status_code == 200, html
    secret = re.search(r'id="new-secret">([^<]+)<', html).group(1)
    assert secret.startswith("sk-proxy-") and "Ops &lt;ops@example.com&gt;" in html
    assert chat(client, key=secret).status_code == 200
    listed = client.get("/console/keys").get_data(as_text=True)
    assert secret not in listed and 'id="key-team-a"' in listed  # shown once only
    assert 'id="key-cfg-key"' in listed and 'id="rotate-cfg-key"' not in listed  # read-only
    rotated = client.post("/console/keys/team-a/rotate",
                          data={"csrf_token": token, "grace_seconds": "0"})
    new_secret = re.search(r'id="new-secret">([^<]+)<', rotated.get_data(as_text=True)).group(1)
    assert new_secret != secret
    assert chat(client, key=secret).status_code == 401
    assert chat(client, key=new_secret).status_code == 200
    revoked = client.post("/console/keys/team-a/revoke", data={"csrf_token": token})
    assert revoked.status_code == 303
    assert revoked.headers["Location"] == "/console/keys?done=revoked&key=team-a"
    assert chat(client, key=new_secret).status_code == 401
    store = app.extensions["llm_proxy"].store
    trail = store.keys.audit_trail("team-a")
    assert [row["action"] for row in trail] == ["revoke", "rotate", "create"]
    assert {row["actor"] for row in trail} == {"console 127.0.0.1"}
    again = client.post("/console/keys/team-a/revoke", data={"csrf_token": token})
    assert again.status_code == 409 and 'id="error"' in again.get_data(as_text=True)
    with_revoked = client.get("/console/keys?revoked=1").get_data(as_text=True)
    assert 'id="key-team-a"' in with_revoked and 'id="revoke-team-a"' not in with_revoked


@pytest.mark.parametrize("form,field", [
    ({"id": "bad id!"}, "id"), ({"id": "cfg-key"}, "cfg-key"),
    ({"requests_per_minute": "ten"}, "requests per minute"),
    ({"requests_per_minute": "-1"}, "requests per minute"),
    ({"tokens_per_minute": "²"}, "tokens per minute"),
    ({"daily_usd": "nan"}, "daily usd"), ({"daily_usd": "1e400"}, "daily usd"),
    ({"soft_limit_percent": "150"}, "soft_limit_percent"),
    ({"expires_at": "tomorrow"}, "expires_at"), ({"owner": "x" * 300}, "owner"),
    ({"models": ",".join(f"m{i}" for i in range(300))}, "models"),
    ({"owner": "nul\x00byte"}, "owner"),
])
def test_a_bad_create_form_is_a_clear_4xx_that_keeps_what_was_typed(
        console_app, tmp_path, form, field):
    app = key_app(console_app, sqlite_section(tmp_path / "proxy.db"))
    client = signed_in(app)
    response = client.post("/console/keys", data={"csrf_token": csrf_of(client, "/console/keys"),
                                                  **form})
    html = response.get_data(as_text=True)
    assert response.status_code in (400, 409), html
    error = re.search(r'id="error"[^>]*>([^<]*)<', html).group(1)
    assert field in error
    assert 'id="new-secret"' not in html
    assert app.extensions["llm_proxy"].store.keys.list() == []


def test_the_keys_page_shows_usage_headroom_and_spend_against_the_budget(
        console_app, tmp_path):
    app = key_app(console_app, sqlite_section(tmp_path / "proxy.db"),
                  pricing={"models": [{"model": "mock-model", "input": 1000, "output": 1000}]})
    client = signed_in(app)
    html = client.post("/console/keys", data={
        "csrf_token": csrf_of(client, "/console/keys"), "id": "limited",
        "requests_per_minute": "5", "tokens_per_minute": "0", "daily_usd": "100"}
    ).get_data(as_text=True)
    secret = re.search(r'id="new-secret">([^<]+)<', html).group(1)
    for _ in range(2):
        assert chat(client, key=secret).status_code == 200
    # usage is read as the writer has written it (within database.flush_interval)
    wait_until(lambda: figures(client, "/console/keys.json")["fields"][
        "key-limited-requests_today"] == "2", what="the two requests in the usage")
    fields = figures(client, "/console/keys.json")["fields"]
    assert fields["key-limited-requests_left"] == "3 of 5"
    assert fields["key-limited-tokens_left"] == "unlimited"
    assert fields["key-limited-requests_today"] == "2"
    assert fields["key-limited-spend_daily"].endswith("of 100 USD")
    assert fields["key-cfg-key-requests_left"] == "unlimited"
    # the headroom is read without taking anything: the limit is untouched by looking
    for _ in range(3):
        figures(client, "/console/keys.json")
    assert figures(client, "/console/keys.json")["fields"]["key-limited-requests_left"] == \
        "3 of 5"


def test_without_the_database_the_keys_and_requests_pages_say_so(console_app):
    app = console_app(auth={"env_keys": f"cfg-key:{CONFIG_SECRET}"})
    client = signed_in(app)
    keys = client.get("/console/keys").get_data(as_text=True)
    assert 'id="database-off"' in keys and 'id="key-cfg-key"' in keys
    assert 'id="create-key-form"' not in keys
    response = client.post("/console/keys", data={"csrf_token": csrf_of(client), "id": "x"})
    assert response.status_code == 404 and "database is off" in response.get_data(as_text=True)
    requests_page = client.get("/console/requests").get_data(as_text=True)
    assert 'id="database-off"' in requests_page
    assert client.get("/console/requests/abc").status_code == 404


# -- requests ---------------------------------------------------------------------------------

def test_the_request_log_filters_by_key_model_status_and_time_and_pages(console_app, tmp_path):
    wall = FakeClock(WALL)
    app = key_app(console_app, sqlite_section(tmp_path / "proxy.db"), wall=wall)
    client = signed_in(app)
    for n in range(55):
        chat(client, key=CONFIG_SECRET if n % 5 == 0 else None)
        wall.advance(1)
    chat(client, {"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]})
    page = client.get("/console/requests")
    html = page.get_data(as_text=True)
    assert page.status_code == 200 and html.count('class="request-row') == 50
    older = re.search(r'id="older" href="([^"]+)"', html).group(1).replace("&amp;", "&")
    assert html.count('class="request-row') == 50
    rest = client.get(older).get_data(as_text=True)
    assert rest.count('class="request-row') == 6 and 'id="newest"' in rest
    by_key = client.get("/console/requests?key_id=cfg-key").get_data(as_text=True)
    assert by_key.count('class="request-row') == 11
    refused = client.get("/console/requests?status=4xx").get_data(as_text=True)
    assert refused.count('class="request-row') == 1 and "model_not_found" in refused
    by_model = client.get("/console/requests?model=no-such-model&status=404")
    assert by_model.get_data(as_text=True).count('class="request-row') == 1
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(WALL + 50))
    recent = client.get(f"/console/requests?{urlencode({'since': since})}")
    assert recent.get_data(as_text=True).count('class="request-row') == 6
    zoned = client.get("/console/requests?" + urlencode({"until": "2030-03-17T17:47:10+00:00"}))
    assert zoned.get_data(as_text=True).count('class="request-row') == 10


@pytest.mark.parametrize("query", [
    "status=abc", "status=99", "status=6xx", "since=yesterday", "until=2030-13-45T99:99",
    "since=1e999", "cursor=-1", "cursor=" + "9" * 30, "key_id=<script>", "key_id=a%00b",
    "model=" + "m" * 500, "model=a%00b",
])
def test_hostile_filters_are_a_clear_400_never_a_500(console_app, tmp_path, query):
    app = key_app(console_app, sqlite_section(tmp_path / "proxy.db"))
    client = signed_in(app)
    response = client.get(f"/console/requests?{query}")
    html = response.get_data(as_text=True)
    assert response.status_code == 400, html
    assert 'id="error"' in html and "<script>" not in html


def test_one_requests_page_shows_its_row_escaped_and_unknown_ids_are_404(console_app, tmp_path):
    app = key_app(console_app, sqlite_section(tmp_path / "proxy.db"))
    client = signed_in(app)
    evil = "<script>alert(1)</script>"
    response = client.post("/v1/chat/completions", headers={"X-Request-ID": "req-evil-1"},
                           json={"model": evil, "messages": [{"role": "user", "content": "x"}]})
    response.close()
    listed = client.get("/console/requests").get_data(as_text=True)
    assert evil not in listed and "&lt;script&gt;" in listed
    detail = client.get("/console/requests/req-evil-1")
    html = detail.get_data(as_text=True)
    assert detail.status_code == 200 and evil not in html
    assert re.search(r'id="detail-status">404<', html)
    assert 'id="request-detail"' in html
    for unknown in ("no-such-id", "bad%20id", "x" * 200, "%3Cscript%3E"):
        assert client.get(f"/console/requests/{unknown}").status_code == 404, unknown


# -- secrets, the admin API, speed --------------------------------------------------------------

def test_no_secret_reaches_a_page_a_json_view_or_the_logs(console_app, tmp_path, capsys, caplog):
    secret_setting = "the-console-session-secret-0123456789"
    app = key_app(console_app, sqlite_section(tmp_path / "proxy.db"),
                  console={"session_secret": secret_setting},
                  observability={"access_log": True})
    client = signed_in(app)
    sign_in(app.test_client(), key="wrong-" + ADMIN)
    chat(client, key=CONFIG_SECRET)
    created = client.post("/console/keys", data={"csrf_token": csrf_of(client, "/console/keys"),
                                                  "id": "made"}).get_data(as_text=True)
    made_secret = re.search(r'id="new-secret">([^<]+)<', created).group(1)
    seen = [client.get(p).get_data(as_text=True) for p in (*PAGES, *JSON_VIEWS)]
    seen.append(client.get("/console/requests?key_id=cfg-key").get_data(as_text=True))
    seen.append(capsys.readouterr().out)
    seen.append(caplog.text)
    for text in seen:
        for secret in (ADMIN, CONFIG_SECRET, secret_setting, made_secret):
            assert secret not in text


def test_the_admin_key_still_opens_the_admin_api_with_the_console_on(console_app):
    client = console_app().test_client()
    assert client.post("/debug/cache/clear",
                       headers={"Authorization": f"Bearer {ADMIN}"}).status_code == 200
    assert client.post("/debug/cache/clear").status_code == 401
    # and a console session is no admin key for the API
    signed = signed_in(console_app())
    assert signed.post("/debug/cache/clear").status_code == 401


def test_every_page_answers_in_under_200_ms_on_a_live_server(console_app, tmp_path):
    app = key_app(console_app, sqlite_section(tmp_path / "proxy.db"))
    with live_server(app) as url:
        session = requests.Session()
        for _ in range(200):
            session.post(url + "/v1/chat/completions", json=CHAT,
                         headers={"Authorization": f"Bearer {CONFIG_SECRET}"})
        assert session.post(url + "/console/sign-in", data={"admin_key": ADMIN},
                            allow_redirects=False).status_code == 303
        detail = session.get(url + "/console/requests").text
        one = re.search(r'href="(/console/requests/[^"]+)"', detail).group(1)
        timings = {}
        for path in (*PAGES, *JSON_VIEWS, one, "/console/sign-in",
                     "/console/static/console.css"):
            seconds = []
            for _ in range(5):
                started = time.perf_counter()
                response = session.get(url + path)
                seconds.append(time.perf_counter() - started)
                assert response.status_code == 200, path
            timings[path] = statistics.median(seconds)
    slow = {path: round(s * 1000, 1) for path, s in timings.items() if s >= 0.2}
    assert not slow, slow


# -- several workers --------------------------------------------------------------------------

def test_every_worker_honours_a_session_made_by_another(tmp_path):
    """WORKERS=2 and no CONSOLE_SESSION_SECRET: the supervisor gives both workers one."""
    port = free_port()
    config = tmp_path / "proxy.yaml"
    config.write_text("providers: [{name: mock, type: mock, models: [mock-model]}]\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONSOLE_", "REDIS_"))}
    env.update({"WORKERS": "2", "HOST": "127.0.0.1", "PORT": str(port), "THREADS": "4",
                "PROXY_CONFIG": str(config), "LOG_LEVEL": "WARNING", "ADMIN_API_KEY": ADMIN,
                "DATABASE_ENABLED": "false", **sqlite_environ(tmp_path)})
    env.pop("WORKER_INDEX", None)
    log_path = tmp_path / "supervisor.log"
    with open(log_path, "wb") as out:
        supervisor = subprocess.Popen([sys.executable, "-m", "app.runtime.workers"], cwd=REPO,
                                      env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        pids = set()

        def get(path, headers=None):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            try:  # a new connection each time: the kernel picks the worker
                conn.request("GET", path, headers={"Connection": "close", **(headers or {})})
                response = conn.getresponse()
                return response.status, response.read()
            finally:
                conn.close()

        def both_up():
            status, body = get("/metrics?format=json")
            pids.add(json.loads(body)["system"]["pid"])
            return len(pids) == 2
        wait_for(both_up, "both workers")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("POST", "/console/sign-in", body=urlencode({"admin_key": ADMIN}),
                     headers={"Content-Type": "application/x-www-form-urlencoded"})
        response = conn.getresponse()
        cookie = response.getheader("Set-Cookie").split(";")[0]
        conn.close()
        statuses = [get("/console/overview.json", {"Cookie": cookie})[0] for _ in range(16)]
        assert statuses == [200] * 16  # 2^-15 that one worker took them all
    finally:
        stop(supervisor)
    assert ADMIN not in log_path.read_text()
