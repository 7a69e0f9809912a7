"""A real browser for the console's tests: Debian's Chromium driven by Playwright.

Playwright's own browser download is never used (this machine has no internet): the tests launch
the system's Chromium (``CHROMIUM``, else /usr/bin/chromium) headless, with the switches that
keep it from calling Google's hosts in the background. Every request a page makes is recorded;
one to any other host than the proxy under test is refused and reported, so a test can assert
that nothing on the console reaches another host (a CDN, a font, an analytics beacon).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Where the tests save their screenshots (two of them are in the README: docs/images/).
SCREENSHOTS = Path(os.environ.get("CONSOLE_SCREENSHOTS", ROOT / "build" / "screenshots"))
SWITCHES = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-default-apps", "--disable-extensions", "--metrics-recording-only"]
TIMEOUT_MS = 10_000  # every wait of a page: a console page loads in well under a second


def chromium() -> str:
    """The Chromium to drive: skipped when there is none, except in CI (CI=true), which fails."""
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not os.access(path, os.X_OK):
        message = f"no Chromium at {path} (apt-get install chromium; or set CHROMIUM)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@contextlib.contextmanager
def launched_chromium():
    """A headless Chromium, closed at the end of the block."""
    executable = chromium()
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=SWITCHES,
                                              timeout=30_000)
        try:
            yield launched
        finally:
            launched.close()


class Visit:
    """A fresh browser context (no cookies) on the proxy at ``base``: its page, and every URL
    the page asked for, those of other hosts refused and listed in ``foreign``."""

    def __init__(self, browser, base: str):
        self.base = base
        self.origin = urlsplit(base).netloc
        self.context = browser.new_context(viewport={"width": 1280, "height": 480},
                                           java_script_enabled=True)
        self.context.set_default_timeout(TIMEOUT_MS)
        self.requested: list[str] = []
        self.foreign: list[str] = []
        self.console_errors: list[str] = []
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda error: self.console_errors.append(str(error)))

    def _route(self, route):
        url = route.request.url
        self.requested.append(url)
        parts = urlsplit(url)
        if parts.scheme in ("data", "blob") or parts.netloc == self.origin:
            route.continue_()
        else:
            self.foreign.append(url)
            route.abort()

    def _console(self, message):
        # A CSP violation, a failed fetch or a script error shows up here as an error.
        if message.type == "error":
            self.console_errors.append(message.text)

    def open(self, path: str):
        response = self.page.goto(self.base + path)
        assert response is not None, path
        return response

    def screenshot(self, name: str) -> Path:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def close(self):
        self.context.close()
