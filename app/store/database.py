"""The connection to the database: the engine for SQLite or PostgreSQL, the schema migrations,
and the one place where the driver's exceptions become the proxy's ``StoreUnavailable``."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import time
from pathlib import Path

import sqlalchemy as sa

from app.errors import InvalidRequest, StoreUnavailable
from app.store import schema
from app.store.schema import HEAD

log = logging.getLogger("llm_proxy.store")
MIGRATIONS = Path(__file__).parent / "migrations"
# One lock id for every proxy on a PostgreSQL server: migrations run one process at a time.
_MIGRATION_LOCK = 0x6C6C6D70  # "llmp"
VERSION_TABLE = "alembic_version"  # where Alembic keeps the revision


def engine_for(settings) -> sa.Engine:
    """The engine for ``settings`` (``DatabaseSettings``). SQLite: the file's folder is made,
    WAL journal so readers never wait on the writer (and several processes may share the file),
    a busy timeout instead of "database is locked". PostgreSQL: a small pool (the request path
    never uses it: only the writer thread and admin calls do), connections checked before use,
    a connect timeout, a statement timeout and TCP timeouts, so a stalled server or path fails
    a call instead of holding it."""
    url = sa.make_url(settings.target)
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            try:
                Path(url.database).parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:  # connecting fails next, and /health says why: serve anyway
                log.error("database %s: cannot make its folder: %s (set DATABASE_PATH to a "
                          "writable file, or DATABASE_ENABLED=false)", url.database, e)
        engine = sa.create_engine(url, connect_args={"timeout": 5.0})
        sa.event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    # A path that silently drops packets never answers: TCP keepalives and tcp_user_timeout
    # end such a call within about 30 s instead of the kernel's hours.
    return sa.create_engine(url, pool_size=2, max_overflow=4, pool_pre_ping=True,
                            pool_timeout=5.0, pool_recycle=1800, connect_args={
                                "connect_timeout": 3, "application_name": "llm-proxy",
                                "options": "-c statement_timeout=10000",
                                "keepalives": 1, "keepalives_idle": 10,
                                "keepalives_interval": 5, "keepalives_count": 3,
                                "tcp_user_timeout": 30000})


def _sqlite_pragmas(connection, _record):
    cursor = connection.cursor()
    # Two processes opening a new file at once both switch it to WAL: SQLite refuses one of
    # them at once ("database is locked", no busy wait), so that one tries again.
    deadline = time.monotonic() + 5.0
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    cursor.execute("PRAGMA synchronous=NORMAL")  # durable at each checkpoint; WAL keeps it safe
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


def describe(engine: sa.Engine) -> str:
    """Where the database is, without its password: for logs and /health."""
    return engine.url.render_as_string(hide_password=True)


def head() -> str:
    """The newest schema revision the code knows (``schema.HEAD``; a test checks it is the
    migrations' own head)."""
    return HEAD


def revision(engine: sa.Engine) -> str | None:
    """The schema revision the database is at (None: empty). Read with one query, so a process
    whose schema is current never imports Alembic (about 9 MB of memory)."""
    with engine.connect() as connection:
        return _revision(connection)


def _revision(connection) -> str | None:
    if not sa.inspect(connection).has_table(VERSION_TABLE):
        return None
    return connection.exec_driver_sql(f"SELECT version_num FROM {VERSION_TABLE}").scalar()


def migrate(engine: sa.Engine, target: str = "head") -> str | None:
    """Upgrade (or downgrade, for a revision below the current one) the schema to ``target``;
    nothing to do costs one query. On PostgreSQL an advisory lock makes processes that start
    together migrate one after the other; on SQLite the file's write lock does.

    An empty database brought to the head gets the code's tables at once, stamped with the
    head revision, without Alembic: every new install and every fresh SQLite file would
    otherwise import Alembic, Mako and Pygments (about 10 MB for the life of the process) to
    run migrations that make the same tables (a test compares both schemas)."""
    wanted = head() if target == "head" else target
    if revision(engine) == wanted:
        return wanted
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(sa.text("SELECT pg_advisory_xact_lock(:id)"),
                               {"id": _MIGRATION_LOCK})
        else:
            # The driver would begin the transaction only at the first INSERT, after the
            # revision is read and the tables made: take the file's write lock first.
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        current = _revision(connection)  # again under the lock: another process may have
        if current == wanted:  # migrated it meanwhile
            return wanted
        log.warning("database schema %s -> %s", current or "empty", wanted)
        if current is None and wanted == HEAD and not _tables(connection):
            _create_at_head(connection)
        else:
            _run_migrations(connection, current, wanted)
    return wanted


def _tables(connection) -> set[str]:
    """The store's tables and Alembic's that the database has (none: it is empty)."""
    ours = set(schema.metadata.tables) | {VERSION_TABLE}
    return set(sa.inspect(connection).get_table_names()) & ours


def _create_at_head(connection) -> None:
    """The code's tables and indexes in an empty database, and Alembic's version table saying
    they are at the head (the table as Alembic makes it, so its later upgrades go on from it)."""
    schema.metadata.create_all(connection)
    version = sa.Table(VERSION_TABLE, sa.MetaData(),
                       sa.Column("version_num", sa.String(32), nullable=False),
                       sa.PrimaryKeyConstraint("version_num", name="alembic_version_pkc"))
    version.create(connection)
    connection.execute(version.insert().values(version_num=HEAD))


def _run_migrations(connection, current: str | None, wanted: str) -> None:
    # Alembic only now, with a migration to run (its import costs memory for good)
    from alembic import command
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    scripts = ScriptDirectory(str(MIGRATIONS))
    if current is not None and any(r.revision == wanted for r in
                                   scripts.iterate_revisions(current, "base")):
        command.downgrade(config, wanted)
    else:
        command.upgrade(config, wanted)


@contextlib.contextmanager
def unavailable_as_error(engine: sa.Engine):
    """Driver and connection failures as StoreUnavailable (503), for the admin API's calls; a
    value the database refuses (PostgreSQL's text holds no NUL character) as InvalidRequest."""
    try:
        yield
    except sa.exc.DataError as e:
        log.info("database %s refused a value: %s", describe(engine), failure(e))
        raise InvalidRequest("A value in the request cannot be stored or looked up "
                             f"({failure(e)}).", code="invalid_value") from None
    except (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError,
            sa.exc.DatabaseError) as e:
        log.warning("database %s: %s", describe(engine), failure(e))
        raise StoreUnavailable("The database did not answer; try again shortly.",
                               headers={"Retry-After": "5"}) from None


def failure(error: BaseException) -> str:
    """One line about a database failure: its kind and the driver's first line, never the
    statement or its parameters (they may hold a request's text)."""
    original = getattr(error, "orig", None) or error
    first = str(original).strip().splitlines()[0] if str(original).strip() else ""
    return f"{type(original).__name__}: {first}"[:300]

