"""The console in a real browser (Debian's Chromium, driven by Playwright: tests/browser.py).

Each test signs in on a live proxy, visits pages, presses their buttons and checks what changed,
on the page and behind it; and every test checks that no page asked another host for anything
and that no script or CSP error was logged. The screenshots land in build/screenshots/ (two of
them are in the README, copied to docs/images/)."""

from __future__ import annotations

import re
import threading
import time
from random import Random

import pytest
import requests

from app import create_app
from tests.browser import Visit, launched_chromium
from tests.conftest import live_server, provider
from tests.databases import sqlite_section
from tests.store_helpers import ROOT
from tests.upstream import FakeUpstream, Reply, chat_completion
from settings import build_settings

expect = pytest.importorskip("playwright.sync_api").expect

# The admin key of the README's example (`ADMIN_API_KEY=... make run`): the one a newcomer types.
ADMIN = re.search(r"ADMIN_API_KEY=(\S+) make run", (ROOT / "README.md").read_text()).group(1)
CHAT = {"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]}
# Chrome logs a page answered with an error status as a console error; these steps expect one.
LOAD_ERROR = re.compile(r"^Failed to load resource: the server responded with a status of "
                        r"(401|403|429)")


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the module's tests; each test gets a fresh context."""
    with launched_chromium() as chromium:
        yield chromium


def settings_of(tmp_path, upstream, **sections):
    """``make run``'s settings with the README's admin key, the database in a temporary SQLite
    file, the cache on, and a second provider (``flaky``, a loopback upstream) whose breaker
    opens at its first failure; ``sections`` over those."""
    return build_settings({
        "admin_api_key": ADMIN,
        "providers": [{"name": "mock", "type": "mock", "models": ["mock-model"]},
                      provider(upstream.url, "flaky", models=["flaky-model"])],
        "database": sqlite_section(tmp_path / "proxy.db"),
        "cache": {"enabled": True},
        "circuit_breaker": {"failure_threshold": 1, "recovery_timeout": 300},
        "http_client": {"retry_attempts": 0, "backoff_base": 0.0},
        "observability": {"access_log": False},
        **sections,
    })


@pytest.fixture
def proxy(tmp_path, upstream):
    """A live proxy (``settings_of``) whose console refreshes four times a second."""
    app = create_app(settings_of(tmp_path, upstream, console={"refresh_seconds": 0.25}))
    try:
        with live_server(app) as base:
            yield base
    finally:
        app.extensions["llm_proxy"].close()


@pytest.fixture
def visit(browser, proxy):
    opened = Visit(browser, proxy)
    yield opened
    try:
        assert opened.foreign == [], f"the console asked other hosts: {opened.foreign}"
        unexpected = [e for e in opened.console_errors if not LOAD_ERROR.match(e)]
        assert unexpected == [], f"errors in the browser's console: {unexpected}"
    finally:
        opened.close()


def sign_in(visit, key=ADMIN, path="/console"):
    visit.open(path)
    page = visit.page
    expect(page).to_have_url(re.compile(r"/console/sign-in"))
    page.fill("#admin-key", key)
    page.click("#sign-in")


def figure(page, name) -> str:
    return page.locator(f"#f-{name}").inner_text().strip()


def test_a_newcomer_signs_in_and_the_overview_goes_live_while_the_readme_curl_runs(visit, proxy):
    page = visit.page
    sign_in(visit)
    expect(page).to_have_url(re.compile(r"/console/?$"))
    expect(page.locator("body#page-overview")).to_be_visible()
    assert figure(page, "requests_hour") == "0"
    # The session cookie: HttpOnly, SameSite=Strict, scoped to /console, no key in it.
    (cookie,) = visit.context.cookies()
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/console"
    assert ADMIN not in cookie["value"]

    for _ in range(3):  # the README's first curl, while the page is open
        answer = requests.post(proxy + "/v1/chat/completions", json=CHAT, timeout=10)
        assert answer.status_code == 200
    # No reload: the page's script fetched the new figures.
    expect(page.locator("#f-requests_hour")).to_have_text("3", timeout=5000)
    expect(page.locator("#live")).to_contain_text("live")
    assert page.locator("#chart-requests path").first.get_attribute("d")
    visit.screenshot("console-overview")


def test_the_overview_reads_without_javascript(browser, proxy):
    requests.post(proxy + "/v1/chat/completions", json=CHAT, timeout=10)
    context = browser.new_context(java_script_enabled=False)
    try:
        page = context.new_page()
        page.goto(proxy + "/console")
        page.fill("#admin-key", ADMIN)
        page.click("#sign-in")
        expect(page.locator("body#page-overview")).to_be_visible()
        assert page.locator("#f-requests_hour").inner_text().strip() == "1"
        assert page.locator("#chart-requests path").first.get_attribute("d")
        page.click("#nav-requests")
        expect(page.locator("#requests .request-row")).to_have_count(1)
    finally:
        context.close()


def test_a_wrong_key_is_refused_then_locked_out_and_the_right_one_waits(visit):
    page = visit.page
    sign_in(visit, key="not-the-admin-key")
    expect(page.locator("#error")).to_be_visible()
    expect(page).to_have_url(re.compile(r"/console/sign-in"))
    for _ in range(4):  # console.sign_in_attempts = 5 a minute
        page.fill("#admin-key", "still-wrong")
        page.click("#sign-in")
    page.fill("#admin-key", ADMIN)
    page.click("#sign-in")
    expect(page.locator("#error")).to_contain_text("Too many wrong keys")
    assert visit.context.cookies() == []


def test_a_flaky_providers_open_breaker_is_reset_with_its_button(visit, proxy, upstream):
    upstream.script(Reply(500, {"error": {"message": "boom"}}))
    failed = requests.post(proxy + "/v1/chat/completions", timeout=10,
                           json={**CHAT, "model": "flaky-model"})
    assert failed.status_code == 502
    page = visit.page
    sign_in(visit, path="/console/providers")
    state = page.locator("#f-provider-flaky-state")
    expect(state).to_have_attribute("data-value", "open")
    assert page.locator("#f-provider-mock-state").get_attribute("data-value") == "closed"
    visit.screenshot("console-providers")
    page.click("#reset-flaky")
    expect(page.locator("#notice")).to_have_text("Breaker reset.")
    expect(state).to_have_attribute("data-value", "closed")
    # Behind the page: the provider is tried again (its upstream answers this time).
    again = requests.post(proxy + "/v1/chat/completions", timeout=10,
                          json={**CHAT, "model": "flaky-model"})
    assert again.status_code == 200 and again.headers["X-Proxy-Provider"] == "flaky"


def test_keys_are_created_used_rotated_and_revoked_from_the_keys_page(visit, proxy):
    page = visit.page
    sign_in(visit, path="/console/keys")
    page.fill("#new-id", "team-b")
    page.fill("#new-daily_usd", "5")
    page.click("#create-key-button")
    secret = page.locator("#new-secret").inner_text().strip()
    assert secret and page.locator("#new-key-id").inner_text() == "team-b"
    used = requests.post(proxy + "/v1/chat/completions", json=CHAT, timeout=10,
                         headers={"Authorization": f"Bearer {secret}"})
    assert used.status_code == 200
    page.goto(proxy + "/console/keys")
    assert page.locator("#new-secret").count() == 0  # shown once
    expect(page.locator("#f-key-team-b-requests_today")).to_have_text("1")

    page.fill("#grace-team-b", "0")
    page.click("#rotate-team-b")
    rotated = page.locator("#new-secret").inner_text().strip()
    assert rotated and rotated != secret

    page.click("#revoke-team-b")
    expect(page.locator("#notice")).to_contain_text("revoked")
    assert page.locator("#key-team-b").count() == 0  # hidden until "show revoked keys"
    page.click("#show-revoked")
    expect(page.locator("#key-team-b .state")).to_have_text("revoked")
    refused = requests.post(proxy + "/v1/chat/completions", json=CHAT, timeout=10,
                            headers={"Authorization": f"Bearer {rotated}"})
    assert refused.status_code == 401


def test_the_request_log_filters_and_opens_one_request(visit, proxy, upstream):
    upstream.script(Reply(500, {"error": {"message": "boom"}}))
    requests.post(proxy + "/v1/chat/completions", json=CHAT, timeout=10)
    requests.post(proxy + "/v1/chat/completions", timeout=10,
                  json={**CHAT, "model": "flaky-model"})
    page = visit.page
    sign_in(visit, path="/console/requests")
    expect(page.locator("#requests .request-row")).to_have_count(2)
    page.fill("#filter-status", "502")
    page.click("#apply-filters")
    expect(page.locator("#requests .request-row")).to_have_count(1)
    assert "status=502" in page.url
    page.locator("a.request-link").first.click()
    detail = page.locator("#request-detail")
    expect(detail).to_contain_text("flaky-model")
    expect(detail).to_contain_text("502")
    page.click("#back-to-requests")
    expect(page.locator("#request-filters")).to_be_visible()


def test_the_cache_page_counts_an_entry_and_clears_it(visit, proxy):
    for _ in range(2):  # a miss that stores, then a hit
        requests.post(proxy + "/v1/chat/completions", json=CHAT, timeout=10,
                      headers={"Authorization": "Bearer anyone"})
    page = visit.page
    sign_in(visit, path="/console/cache")
    expect(page.locator("#f-cache-response-entries")).to_have_text(re.compile(r"^1 of "))
    page.click("#clear-response")
    expect(page.locator("#notice")).to_have_text("The response cache was cleared.")
    expect(page.locator("#f-cache-response-entries")).to_have_text(re.compile(r"^0 of "))
    again = requests.post(proxy + "/v1/chat/completions", json=CHAT, timeout=10,
                          headers={"Authorization": "Bearer anyone"})
    assert again.headers["X-Cache"] == "MISS"


def test_every_page_is_reachable_from_the_nav_and_sign_out_ends_the_session(visit, proxy):
    page = visit.page
    sign_in(visit)
    for name in ("providers", "keys", "requests", "cache", "overview"):
        page.click(f"#nav-{name}")
        expect(page.locator(f"body#page-{name}")).to_be_visible()
        expect(page.locator(f"#nav-{name}")).to_have_attribute("aria-current", "page")
    # Every asset came from the proxy itself, and each page carried the strict CSP.
    assert {u.split("/")[2] for u in visit.requested} == {proxy.split("/")[2]}
    csp = requests.get(proxy + "/console/sign-in", timeout=10).headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    page.click("#sign-out")
    expect(page).to_have_url(re.compile(r"/console/sign-in"))
    page.goto(proxy + "/console/keys")
    expect(page).to_have_url(re.compile(r"/console/sign-in\?next="))


def test_a_page_stops_refreshing_once_signed_out_elsewhere(visit):
    page = visit.page
    sign_in(visit)
    expect(page.locator("#live")).to_contain_text("refreshed")
    # Another tab of the same browser signs out: this page's next refresh is refused.
    other = visit.context.new_page()
    other.goto(visit.base + "/console/cache")
    other.click("#sign-out")
    expect(page.locator("#live")).to_contain_text("signed out", timeout=5000)


def test_a_form_posted_from_another_site_is_refused(visit, proxy):
    page = visit.page
    sign_in(visit)
    token = page.locator("#sign-out-form input[name=csrf_token]").get_attribute("value")
    # The other site's page posts a form to the console, even with a stolen token: SameSite=Strict
    # keeps the cookie home, and the Sec-Fetch-Site check would refuse it anyway.
    hits = []
    served = threading.Event()

    def attacker(route):
        hits.append(route.request.url)
        served.set()
        route.fulfill(status=200, content_type="text/html", body=(
            f'<form id="f" method="post" action="{proxy}/console/cache/clear">'
            f'<input name="name" value="all"><input name="csrf_token" value="{token}"></form>'
            '<script>document.getElementById("f").submit()</script>'))

    visit.context.route("http://attacker.test/**", attacker)
    page.goto("http://attacker.test/")
    assert served.wait(5)
    expect(page.locator("body")).to_contain_text(re.compile("another site|sign in", re.I))
    assert hits == ["http://attacker.test/"]
    page.goto(proxy + "/console/cache")  # the caches were not cleared, and still signed in
    expect(page.locator("body#page-cache")).to_be_visible()


class Wall:
    """The wall clock of an app whose traffic is replayed over the last hour: real time less
    ``behind`` seconds, which the test shrinks to 0 as it sends the hour's requests."""

    def __init__(self, behind: float):
        self.behind = behind

    def __call__(self):
        return time.time() - self.behind


def test_an_hours_traffic_with_an_incident_charts_on_the_overview(browser, tmp_path):
    """The README's screenshot: an hour of real requests (cache hits, a slower provider, an
    outage of it at minute 40 that opens its breaker), told on the overview's charts."""
    random, outage = Random(19), threading.Event()

    def flaky(recorded):  # the upstream's answer: slow-ish, or a 500 during the outage
        if outage.is_set():
            return Reply(500, {"error": {"message": "overloaded"}})
        return Reply(200, chat_completion("flaky-model", "ok"), delay=random.uniform(0.01, 0.04))

    wall = Wall(3600)
    with FakeUpstream(default=flaky) as upstream:
        settings = settings_of(tmp_path, upstream, circuit_breaker={
            "failure_threshold": 3, "recovery_timeout": 0.05})
        app = create_app(settings, wall=wall)
        try:
            with live_server(app) as base, requests.Session() as client:
                steps = 700
                for step in range(steps):  # one request every 5 s of the hour
                    wall.behind = (steps - step) * 5
                    if 470 <= step < 500:
                        outage.set()
                    else:
                        outage.clear()
                    if random.random() < 0.35:
                        content = f"step {step}"  # never cached: each reaches the provider
                        body = {"model": "flaky-model"}
                    else:
                        content = f"q{random.randrange(40)}"  # 40 questions: cache hits
                        body = {"model": "mock-model"}
                    body["messages"] = [{"role": "user", "content": content}]
                    client.post(base + "/v1/chat/completions", json=body, timeout=10,
                                headers={"Authorization": "Bearer anyone"})
                wall.behind = 0
                visit = Visit(browser, base)
                try:
                    sign_in(visit)
                    page = visit.page
                    expect(page.locator("body#page-overview")).to_be_visible()
                    assert int(figure(page, "requests_hour")) == steps
                    assert int(figure(page, "errors_hour")) > 0
                    visit.screenshot("console-overview-hour")
                    assert visit.foreign == []
                finally:
                    visit.close()
        finally:
            app.extensions["llm_proxy"].close()
