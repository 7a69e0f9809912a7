"""The database going away under a live proxy (issue 18): PostgreSQL behind a TCP proxy the
test cuts or stalls, SQLite locked by another connection, PostgreSQL down at start-up. Every
request is still answered, quickly; /health says the database is failing without quoting a
password or SQL; the rows queued meanwhile are written once it is back, or counted (and
logged) as dropped when they overflow the queue."""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import time
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import pytest

from app.store.database import head, revision
from tests import databases
from tests.store_helpers import store_of, wait_until
from tests.store_support import (Apps, admin, all_rows, bearer, create_key, post, sample,
                                 wait_written)
from tests.tcp_proxy import CuttableProxy

MOCK = {"name": "mock", "type": "mock", "models": ["mock-model"]}
BODY = {"model": "mock-model", "messages": [{"role": "user", "content": "still there?"}]}
FAST = 1.0  # seconds: the slowest a request may take while the database is away
PASSWORD = "pw-that-must-never-show"
CONFIG_KEY = "sk-config-key-outage-0123456789"
AUTH = {"api_keys": [{"id": "config-key",
                      "sha256": hashlib.sha256(CONFIG_KEY.encode()).hexdigest()}]}


@pytest.fixture
def apps():
    built = Apps()
    yield built
    built.close()


@dataclass
class Behind:
    tcp: CuttableProxy  # the TCP path to PostgreSQL, to cut, stall and restore
    section: dict  # the ``database`` section of a fresh database reached through it
    password: str  # the password in its URL, which must show nowhere
    apps: Apps  # closed (the path restored) before the database is dropped


@pytest.fixture
def behind_proxy(postgres_url):
    """A fresh PostgreSQL database reached through a CuttableProxy; made and dropped on the
    server directly. A password is put in the URL when it has none (trust authentication
    ignores it), so the test can look for it where it must not be."""
    server = urlsplit(postgres_url)
    with CuttableProxy(server.hostname, server.port or 5432) as tcp:
        with databases.fresh_postgres(postgres_url, address=tcp.address) as section:
            url = urlsplit(section["url"])
            password = url.password or PASSWORD
            if url.password is None and url.username:
                netloc = url.netloc.replace("@", f":{PASSWORD}@", 1)
                section = {**section, "url": urlunsplit(url._replace(netloc=netloc))}
            built = Apps()
            try:
                yield Behind(tcp, section, password, built)
            finally:
                tcp.restore()  # the apps write what they hold as they close
                built.close()


def served_fast(client, count, headers=None) -> list:
    """``count`` requests, each answered 200 within FAST seconds; their request ids."""
    ids = []
    for _ in range(count):
        started = time.monotonic()
        response = post(client, "/v1/chat/completions", BODY, headers)
        took = time.monotonic() - started
        assert response.status_code == 200, response.get_data(as_text=True)
        assert took < FAST, f"a request took {took:.2f} s while the database was away"
        ids.append(response.headers["X-Request-ID"])
    return ids


def database_check(client) -> dict:
    response = client.get("/health")
    assert response.status_code == 200  # a warning, never unhealthy: the proxy serves
    return response.json["checks"]["database"]


def wait_health(client, status, timeout=5.0) -> dict:
    wait_until(lambda: database_check(client)["status"] == status, timeout=timeout,
               what=f"/health's database check turning {status}")
    return database_check(client)


def assert_says_nothing_secret(check: dict, password: str):
    text = str(check)
    assert password not in text
    for sql in ("INSERT", "SELECT", "[SQL", "[parameters"):
        assert sql not in text


def test_postgres_cut_mid_run_loses_no_request(behind_proxy):
    """Traffic flowing; the TCP path to PostgreSQL cut: 30 requests all answered 200, each
    within FAST seconds; /health warns (last_error says why, without the URL's password or
    any SQL); once restored, every row queued during the cut is written: the request log
    has exactly the 40 requests sent."""
    tcp, section, password, apps = (behind_proxy.tcp, behind_proxy.section,
                                    behind_proxy.password, behind_proxy.apps)
    app = apps.make(section, [MOCK])
    client = app.test_client()
    sent = served_fast(client, 10)
    wait_written(app, 10)
    assert database_check(client)["status"] == "healthy"

    tcp.cut()
    sent += served_fast(client, 30)
    check = wait_health(client, "warning")
    assert check["last_error"] and check["failing_for"] is not None
    assert_says_nothing_secret(check, password)
    assert client.get("/health").json["status"] == "warning"
    assert store_of(app).writer.stats()["written"] == 10

    tcp.restore()
    wait_written(app, 40, timeout=8)
    assert wait_health(client, "healthy")["last_error"] is None
    assert [r["request_id"] for r in all_rows(client)] == sent
    assert store_of(app).writer.stats()["dropped"] == 0


def test_postgres_cut_with_a_small_queue_counts_what_overflows(behind_proxy, caplog):
    """queue_size 5 and the database cut: what the queue (and the writer's batch in hand)
    cannot hold is dropped, counted, logged and exported; after the restore, written plus
    dropped is every request sent, and the request log has the written ones."""
    tcp, section, apps = behind_proxy.tcp, behind_proxy.section, behind_proxy.apps
    app = apps.make(section, [MOCK], database={"queue_size": 5})
    client = app.test_client()
    served_fast(client, 2)
    wait_written(app, 2)
    tcp.cut()
    with caplog.at_level(logging.ERROR, logger="llm_proxy.store"):
        served_fast(client, 20)
        check = wait_health(client, "warning")
    assert check["dropped"] > 0
    tcp.restore()
    writer = store_of(app).writer
    wait_until(lambda: writer.stats()["written"] + writer.stats()["dropped"] == 22
               and writer.stats()["queued"] == 0, timeout=8, what="every row written or dropped")
    stats = writer.stats()
    # Kept: the 2 written before, the writer's batch in hand (its first row and the queue
    # it drained), and a full queue after it.
    assert 2 + 5 <= stats["written"] <= 2 + (1 + 5) + 5
    assert stats["dropped"] == 22 - stats["written"]
    assert len(all_rows(client)) == stats["written"]
    assert sample(app, "llm_proxy_store_dropped_rows_total") == stats["dropped"]
    assert sample(app, "llm_proxy_store_written_rows_total") == stats["written"]
    assert database_check(client)["dropped"] == stats["dropped"]
    dropped_lines = [r for r in caplog.records if "rows dropped" in r.getMessage()]
    assert dropped_lines and dropped_lines[0].levelno == logging.ERROR


def test_postgres_stalled_keeps_requests_fast(behind_proxy):
    """The path to PostgreSQL stalled (bytes held, nothing refused): the writer's call hangs,
    the requests do not; the rows are written once it flows again."""
    tcp, section, apps = behind_proxy.tcp, behind_proxy.section, behind_proxy.apps
    app = apps.make(section, [MOCK])
    client = app.test_client()
    sent = served_fast(client, 3)
    wait_written(app, 3)
    tcp.stall()
    sent += served_fast(client, 20)
    assert store_of(app).writer.stats()["written"] == 3
    tcp.restore()
    wait_written(app, 23, timeout=8)
    assert [r["request_id"] for r in all_rows(client)] == sent


def test_sqlite_locked_by_another_connection_keeps_requests_fast(apps, tmp_path):
    """Another connection holds the SQLite file's write lock (BEGIN EXCLUSIVE): the writer
    waits on it, the requests do not; once the lock is released the rows are written."""
    path = tmp_path / "proxy.db"
    app = apps.make(databases.sqlite_section(path), [MOCK])
    client = app.test_client()
    sent = served_fast(client, 3)
    wait_written(app, 3)
    writer = store_of(app).writer
    locker = sqlite3.connect(path, isolation_level=None, timeout=5)
    try:
        locker.execute("BEGIN EXCLUSIVE")
        sent += served_fast(client, 10)
        # The writer has taken the rows off the queue and waits on the lock with them.
        wait_until(lambda: writer.stats()["queued"] == 0, what="the writer taking its batch")
        assert writer.stats()["written"] == 3
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    wait_written(app, 13, timeout=8)
    assert [r["request_id"] for r in all_rows(client)] == sent


def test_postgres_down_at_start_up(behind_proxy, caplog):
    """PostgreSQL unreachable when the proxy starts: it starts anyway (logging why in one
    line each, without the password) and serves the configuration's keys and anonymous
    requests; keys made over HTTP wait (503); /health warns. Once the database is back the
    writer runs the migrations, writes the rows queued meanwhile and loads the keys: a key
    made then works."""
    tcp, section, password, apps = (behind_proxy.tcp, behind_proxy.section,
                                    behind_proxy.password, behind_proxy.apps)
    tcp.cut()
    started = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="llm_proxy.store"):
        app = apps.make(section, [MOCK], auth=AUTH)
    assert time.monotonic() - started < 5
    said = [r.getMessage() for r in caplog.records if r.name == "llm_proxy.store"]
    assert any("migrations failed" in line for line in said)
    for line in said:
        assert "\n" not in line and password not in line, line
    client = app.test_client()
    sent = served_fast(client, 3, bearer(CONFIG_KEY)) + served_fast(client, 2)
    check = database_check(client)
    assert check["status"] == "warning" and check["last_error"]
    assert_says_nothing_secret(check, password)
    refused = client.post("/admin/keys", json={}, headers=admin())
    assert refused.status_code == 503

    tcp.restore()
    wait_written(app, 5, timeout=8)
    assert revision(store_of(app).engine) == head()
    rows = all_rows(client)
    assert [r["request_id"] for r in rows] == sent
    assert [r["key_id"] for r in rows] == ["config-key"] * 3 + ["anonymous"] * 2
    wait_health(client, "healthy")
    _, key = create_key(client)
    assert post(client, "/v1/chat/completions", BODY, bearer(key)).status_code == 200
