"""The store's schema migrations (app/store/migrations, Alembic) on real SQLite and real
PostgreSQL (the ``database`` fixture): from an empty database, from the previous schema, down
and up again, not again at each start-up, and several start-ups at once on a new database."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from app.store import Store, schema
from app.store.database import head, migrate, revision
from app.store.keys import KeyTable
from app.upstream.secrets import Secrets
from tests.store_helpers import (MODEL, Apps, admin, chat, cli_environ, engine_of,
                                 settings_for, store_of, wait_until)

STORE_TABLES = {"keys", "audit", "spend", "requests"}
# What a migration writes (a no-op one reads only).
WRITES = ("CREATE", "ALTER", "DROP", "INSERT INTO ALEMBIC_VERSION", "UPDATE ALEMBIC_VERSION",
          "DELETE FROM ALEMBIC_VERSION")


@pytest.fixture
def apps(database):
    # on the database: its apps are closed before it is dropped
    with Apps() as made:
        yield made


@pytest.fixture
def engine(database):
    engine = engine_of(database)
    yield engine
    engine.dispose()


def tables(engine) -> set[str]:
    return set(sa.inspect(engine).get_table_names()) - {"alembic_version"}


@contextlib.contextmanager
def statements():
    """Every SQL statement any engine runs in the block, upper-cased."""
    seen: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany):
        seen.append(" ".join(statement.split()).upper())

    sa.event.listen(sa.Engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        sa.event.remove(sa.Engine, "before_cursor_execute", record)


def migration_writes(seen: list[str]) -> list[str]:
    return [s for s in seen if s.startswith(WRITES)]


def test_an_empty_database_migrates_to_the_schema_of_the_code(engine):
    assert revision(engine) is None and tables(engine) == set()
    assert migrate(engine) == head()
    assert revision(engine) == head()
    assert tables(engine) == set(schema.metadata.tables) == STORE_TABLES
    assert compared_with_the_code(engine) == []


def test_the_migrations_from_empty_make_the_schema_an_empty_database_gets(engine):
    """Start-up makes an empty database's tables from app/store/schema.py without Alembic;
    the migrations, run one by one from empty, make exactly the same tables, columns, types
    and indexes (Alembic's autogenerate finds nothing to add)."""
    with statements() as seen:
        assert migrate(engine, "0001") == "0001"  # no longer empty: Alembic from here on
        assert migrate(engine) == head()
    assert any(s.startswith("UPDATE ALEMBIC_VERSION") for s in seen)  # Alembic ran them
    assert revision(engine) == head() and tables(engine) == STORE_TABLES
    assert compared_with_the_code(engine) == []


def compared_with_the_code(engine) -> list:
    """What Alembic's autogenerate would change to reach app/store/schema.py (server defaults
    it compares wrongly on SQLite)."""
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return compare_metadata(context, schema.metadata)


def test_a_database_of_the_previous_schema_keeps_its_keys(engine, apps, database):
    migrate(engine, "0001")
    assert revision(engine) == "0001" and tables(engine) == {"keys", "audit"}
    secret, _ = KeyTable(engine).create({"models": [MODEL], "owner": "before"}, "test",
                                        "older")

    assert migrate(engine) == head()
    assert tables(engine) == STORE_TABLES

    # the key works through an app, and its request reaches the new tables
    app = apps(database)
    client = app.test_client()
    assert chat(client, secret) == (200, None)
    wait_until(lambda: store_of(app).writer.stats()["written"] >= 1, what="the request's row")
    rows = admin(client, "GET", "/admin/requests?key_id=older").get_json()["data"]
    assert [(r["key_id"], r["status"]) for r in rows] == [("older", 200)]
    spend = admin(client, "GET", "/admin/spend?group_by=key").get_json()["data"]
    assert [(r["key_id"], r["requests"]) for r in spend] == [("older", 1)]
    assert admin(client, "GET", "/admin/keys/older").get_json()["owner"] == "before"


def test_a_database_migrates_down_and_up_again(engine, apps, database):
    migrate(engine)
    secret, _ = KeyTable(engine).create({}, "test", "kept")

    assert migrate(engine, "0001") == "0001"
    assert revision(engine) == "0001" and tables(engine) == {"keys", "audit"}
    assert KeyTable(engine).get("kept")["id"] == "kept"

    assert migrate(engine) == head()
    assert revision(engine) == head() and tables(engine) == STORE_TABLES
    assert chat(apps(database).test_client(), secret) == (200, None)


def test_an_app_on_a_migrated_database_does_not_migrate_it_again(apps, database, engine):
    with statements() as first:
        apps(database)
    assert migration_writes(first)  # the first start-up made the schema (so this sees them)

    with statements() as second:
        app = apps(database)
    assert migration_writes(second) == []
    assert store_of(app).migrated and revision(engine) == head()

    started = time.monotonic()
    with statements() as again:
        assert migrate(engine) == head()
    assert migration_writes(again) == [] and time.monotonic() - started < 1.0


def test_start_ups_at_the_same_time_on_a_new_database_all_come_up(database):
    """Processes starting together migrate one at a time (PostgreSQL: an advisory lock;
    SQLite: the file's write lock, taken before the revision is read)."""
    count = 4
    barrier = threading.Barrier(count)
    stores: list[Store] = []

    def start_up():
        settings = settings_for(database)
        barrier.wait()
        stores.append(Store(settings, secrets=Secrets(), start=False))

    threads = [threading.Thread(target=start_up) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    try:
        assert len(stores) == count
        assert [(s.migrated, s.writer.last_error) for s in stores] == [(True, "")] * count
        assert revision(stores[0].engine) == head()
    finally:
        for store in stores:
            store.close()


# Waits until the given wall-clock second, then migrates: the processes start together.
MIGRATE_AT = """
import sys, time
from app.store.database import engine_for, migrate
from settings import load_settings
engine = engine_for(load_settings().database)
time.sleep(max(0.0, float(sys.argv[1]) - time.time()))
print(migrate(engine))
"""


def test_processes_starting_at_the_same_time_on_a_new_database_all_migrate(database,
                                                                             tmp_path, engine):
    start = time.time() + 3.0  # once every process has imported the app
    processes = [subprocess.Popen([sys.executable, "-c", MIGRATE_AT, str(start)], cwd=tmp_path,
                                  env=cli_environ(database), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = []
    for process in processes:
        try:
            out, err = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
        results.append((process.returncode, out.strip(), err[-500:]))
    assert [(code, out) for code, out, _ in results] == [(0, head())] * 3, results
    assert revision(engine) == head() and tables(engine) == STORE_TABLES


def test_the_code_knows_the_newest_migration():
    """schema.HEAD, what start-up compares the database's revision with (without importing
    Alembic), is the head of the migrations themselves."""
    from alembic.script import ScriptDirectory

    from app.store.database import MIGRATIONS
    assert ScriptDirectory(str(MIGRATIONS)).get_current_head() == head() == schema.HEAD


def test_a_process_whose_schema_is_current_never_imports_alembic(database, engine):
    """Alembic costs about 9 MB once imported: a start-up with nothing to migrate leaves it
    out (one that migrates needs it, once)."""
    migrate(engine)
    code = ("import sys; from app import create_app; from tests.store_helpers import "
            f"settings_for; app = create_app(settings_for({database!r})); "
            "app.extensions['llm_proxy'].close(); print('alembic' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, env=cli_environ(database))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_a_process_that_makes_a_new_database_never_imports_alembic(database, engine):
    """A new database is made from the code's schema: Alembic (with Mako and Pygments, about
    10 MB) stays out of the process that makes it, and so does the SQLAlchemy dialect of the
    other database (PostgreSQL's, about 2 MB, in a process on SQLite)."""
    unused = ["alembic", "mako", "pygments"]
    if engine.dialect.name == "sqlite":
        unused.append("sqlalchemy.dialects.postgresql")
    code = ("import sys; from app import create_app; from tests.store_helpers import "
            f"settings_for; app = create_app(settings_for({database!r})); "
            "app.extensions['llm_proxy'].close(); "
            f"print([m for m in {unused!r} if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, env=cli_environ(database))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    assert revision(engine) == head() and tables(engine) == STORE_TABLES
