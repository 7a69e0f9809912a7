"""Databases for the store's tests: a fresh, empty SQLite file or PostgreSQL database each, as
the ``database`` settings section that points the app at it."""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql

SERVER_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")

# Short enough that a test sees a reload or a written row within a fraction of a second.
TEST_INTERVALS = {"refresh_interval": 0.2, "flush_interval": 0.05}


def server_problem(server_url: str = SERVER_URL) -> str | None:
    """Why the PostgreSQL server at ``server_url`` cannot be used, or None when it answers."""
    try:
        with psycopg.connect(server_url, connect_timeout=2) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as e:
        return " ".join(str(e).split()) or type(e).__name__  # libpq's lines on one
    return None


def create_database(server_url: str = SERVER_URL) -> str:
    """A new empty database on the server; its name (llmproxy_test_<hex>)."""
    name = f"llmproxy_test_{uuid.uuid4().hex}"
    # CREATE DATABASE cannot run inside a transaction.
    with psycopg.connect(server_url, autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return name


def drop_database(name: str, server_url: str = SERVER_URL):
    """Drop ``name``, ending the sessions an app under test may still hold in it (PG 13+)."""
    with psycopg.connect(server_url, autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                     .format(sql.Identifier(name)))


def database_url(server_url: str, name: str, address: tuple[str, int] | None = None) -> str:
    """``server_url`` naming database ``name``, at ``address`` (host, port) instead of the
    server's own when given: a TCP proxy in front of it."""
    parts = urlsplit(server_url)
    netloc = parts.netloc
    if address is not None:
        user, at, _ = netloc.rpartition("@")
        netloc = f"{user}{at}{address[0]}:{address[1]}"
    return urlunsplit(parts._replace(netloc=netloc, path=f"/{name}"))


def sqlite_section(path: str | Path) -> dict:
    """The ``database`` section for a SQLite file (created by the app on first use)."""
    # enabled said outright: make_app turns an unsaid one off.
    return {"enabled": True, "path": str(path), **TEST_INTERVALS}


def sqlite_environ(directory: str | Path) -> dict:
    """Variables for a proxy started as a process with the inherited environment: its SQLite
    file in ``directory`` (a test's own), never data/ in the checkout, and no DATABASE_URL the
    shell may have set."""
    return {"DATABASE_PATH": str(Path(directory) / "proxy.db"), "DATABASE_URL": ""}


def postgres_section(url: str) -> dict:
    """The ``database`` section for a PostgreSQL database URL."""
    return {"enabled": True, "url": url, **TEST_INTERVALS}


@contextlib.contextmanager
def fresh_postgres(server_url: str = SERVER_URL, address: tuple[str, int] | None = None):
    """A new empty database on the server for the block, dropped afterwards; yields its
    ``database`` section. With ``address`` the app is pointed there (a TCP proxy to the
    server) while the database itself is made and dropped on the server directly."""
    name = create_database(server_url)
    try:
        yield postgres_section(database_url(server_url, name, address))
    finally:
        drop_database(name, server_url)
