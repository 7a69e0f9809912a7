"""Fixtures: apps built from settings dicts, fake upstreams, and a live waitress on port 0."""

from __future__ import annotations

import os
import threading
import time
import uuid

import pytest
import redis
from app import create_app
from app.runtime.server import served_in_thread
from settings import build_settings
from tests import databases
from tests.upstream import FakeUpstream


def provider(url, name="up", *, models=("gpt-test",), **fields):
    """An openai-type provider entry pointing at a fake upstream."""
    return {"name": name, "type": "openai", "base_url": url + "/v1", "models": list(models),
            **fields}


@pytest.fixture
def upstream():
    with FakeUpstream() as fake:
        yield fake


@pytest.fixture
def upstream_b():
    with FakeUpstream() as fake:
        yield fake


def settings_of(data: dict, environ=None):
    """``build_settings`` for tests that build an app themselves: the database off unless
    ``data`` turns it on (by default it would write data/llm-proxy.db where the test runs)."""
    database = {"enabled": False, **data.get("database", {})}
    return build_settings({**data, "database": database}, environ)


@pytest.fixture
def make_app():
    """Build an app from provider entries and setting sections; closed after the test."""
    apps = []

    def make(providers, clock=None, **sections):
        data = {"providers": providers, **sections}
        http = data.setdefault("http_client", {})
        http.setdefault("backoff_base", 0.0)  # retries without waiting, unless a test asks
        http.setdefault("timeout", 5.0)
        http.setdefault("connect_timeout", 2.0)
        # Tests of routing repeat identical requests: the cache is on only where a test says.
        data.setdefault("cache", {}).setdefault("enabled", False)
        # The database is on by default (data/llm-proxy.db in the working directory): off here,
        # so no test writes one by accident; the store's tests pass a `database` section.
        data.setdefault("database", {}).setdefault("enabled", False)
        options = {"clock": clock} if clock else {}
        app = create_app(build_settings(data), **options)
        app.testing = True
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.extensions["llm_proxy"].close()


def live_server(app, threads=8):
    """Serve ``app`` on a free loopback port with the production server (app/runtime/server.py: its
    options, poll loop and header-stage checks); yields the base URL."""
    return served_in_thread(app, threads=threads, channel_request_lookahead=1)


def wait_for_calls(upstream, n, timeout=5.0):
    """Until the fake upstream has seen ``n`` calls; past ``timeout`` seconds the test fails
    (its hanging calls released first) instead of waiting forever."""
    deadline = time.monotonic() + timeout
    while upstream.calls < n:
        if time.monotonic() > deadline:
            upstream.stopping.set()
            pytest.fail(f"the upstream saw {upstream.calls} of {n} calls in {timeout} s")
        time.sleep(0.01)


class FakeClock:
    """A monotonic clock that moves only when a test advances it."""

    def __init__(self, start=1000.0):
        self.now = start
        self._lock = threading.Lock()  # advances from several threads never go backwards

    def __call__(self):
        return self.now

    def advance(self, seconds):
        with self._lock:
            self.now += seconds


REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture(scope="session")
def redis_url():
    """The test Redis: skipped when unreachable, except in CI (CI=true), where that fails."""
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        client.ping()
    except redis.RedisError as e:
        if os.environ.get("CI") == "true":
            pytest.fail(f"Redis at {REDIS_URL} is unreachable in CI: {e}")
        pytest.skip(f"Redis at {REDIS_URL} is unreachable ({e}); set TEST_REDIS_URL")
    finally:
        client.close()
    return REDIS_URL


@pytest.fixture
def prefix(redis_url):
    """A key prefix of this test's own; its keys are deleted afterwards (never FLUSHDB)."""
    prefix = f"llmproxy-test:{uuid.uuid4().hex}:"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=prefix + "*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture(scope="session")
def postgres_url():
    """The test PostgreSQL server: skipped when unreachable, except in CI (CI=true), where
    that fails."""
    problem = databases.server_problem(databases.SERVER_URL)
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL at {databases.SERVER_URL} is unreachable in CI: {problem}")
        pytest.skip(f"PostgreSQL at {databases.SERVER_URL} is unreachable ({problem}); "
                    "set TEST_POSTGRES_URL")
    return databases.SERVER_URL


@pytest.fixture(params=["sqlite", "postgresql"], ids=["sqlite", "postgresql"])
def database(request, tmp_path):
    """The ``database`` settings section of a fresh, empty database of each kind: a SQLite
    file in the test's directory, or a PostgreSQL database dropped after the test."""
    if request.param == "sqlite":
        yield databases.sqlite_section(tmp_path / "proxy.db")
        return
    with databases.fresh_postgres(request.getfixturevalue("postgres_url")) as section:
        yield section
