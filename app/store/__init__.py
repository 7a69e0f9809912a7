"""Keys, spend and the request log in a database (SQLite, or PostgreSQL with DATABASE_URL),
kept off the request path.

The request path reads ``directory`` (the keys) and ``ledger`` (spend against budgets): copies
in this process that the writer thread reloads every ``database.refresh_interval`` seconds and
at once after a change (announced to every process through Redis when REDIS_URL is set). It
writes only through ``record``, which queues a row for the writer. The admin API and the CLI
(``python -m app.keys``) read and change the database directly: ``keys`` (the key table and its
audit trail), ``spend_report``, ``requests_page``/``request``/``requests_export``.
"""

from __future__ import annotations

import getpass
import logging
import socket
import threading
import time

from app.store import request_log, spend as spend_module
from app.store.database import describe, engine_for, failure, migrate, unavailable_as_error
from app.store.keys import UNAUTHENTICATED, KeyDirectory, KeyTable
from app.store.request_log import Redactor, usage_counts
from app.store.spend import SpendLedger, day_of
from app.store.writer import Writer

log = logging.getLogger("llm_proxy.store")
STALLED = 10.0  # seconds one database call may take before /health warns


class Store:
    def __init__(self, settings, *, secrets, router=None, clock=time.monotonic, wall=time.time,
                 start=True):
        db = self.settings = settings.database
        self.engine = engine_for(db)
        self.where = describe(self.engine)
        self.backend = self.engine.dialect.name
        self.wall = wall
        self.router = router
        config_ids = settings.auth.client_keys().ids
        self.keys = KeyTable(self.engine, config_ids=config_ids, wall=wall)
        self.directory = KeyDirectory(settings.auth, wall=wall)
        # Held from reading the keys table to loading what it read: a reload that read before
        # a key was made must not load its older rows after the one that read it.
        self._keys_loading = threading.Lock()
        self.ledger = SpendLedger(wall=wall)
        self.redactor = Redactor(secrets, db.redact_patterns, db.log_body_max_kb * 1024) \
            if db.log_bodies else None
        self.writer = Writer(self.engine, self.ledger, refresh=self.refresh, settings=db,
                             reload_spend=self.reload_spend, clock=clock, wall=wall,
                             prepare=self.ready)
        self._channel = f"{settings.redis.prefix}store:keys-changed"
        self._redis = _redis(settings.redis.url) if settings.redis.url else None
        self._listener = None
        self.migrated = False
        if db.migrate:
            self._migrate()
        if start:
            self.start()

    def _migrate(self) -> None:
        """At start-up; a database that does not answer yet is tried again by the writer (the
        proxy serves meanwhile, with the configuration's keys)."""
        try:
            self.ready()
        except Exception as e:  # noqa: BLE001 - any failure: serve, and say so in /health
            log.error("database %s: migrations failed: %s", self.where, failure(e))
            self.writer.last_error = failure(e)
            self.writer.failing_since = self.writer.clock()

    def start(self) -> None:
        try:
            self.refresh()
        except Exception as e:  # noqa: BLE001 - the writer retries and /health reports it
            log.error("database %s: keys not loaded yet: %s", self.where, failure(e))
        self.writer.start()
        if self._redis is not None:
            self._listen()

    def ready(self) -> None:
        """The schema before the writer's first load or write: the migrations start-up could
        not run (the database did not answer) run once it does. Without this, rows queued
        while it was down were retried against missing tables for ever, and the refresh
        that would have migrated never came (the writer retries its batch first)."""
        if not self.migrated and self.settings.migrate:
            migrate(self.engine)
            self.migrated = True

    def refresh(self) -> None:
        """Reload the keys and spend totals the request path reads (the writer's thread: the
        spend it loads then holds every batch it wrote, and none it has not)."""
        self.ready()
        with self._keys_loading:
            with self.engine.connect() as connection:
                rows = self.keys.everyone(connection)
                days, totals = spend_module.load_totals(connection, self.wall())
            self.directory.load(rows)
        self.ledger.load(days, totals)

    def reload_spend(self) -> None:
        """The spend totals alone, while some key has a budget (the writer's thread, every
        second): other processes' spend reaches this one's budgets within about a second."""
        if not self.directory.budgeted:
            return
        with self.engine.connect() as connection:
            days, totals = spend_module.load_totals(connection, self.wall())
        self.ledger.load(days, totals)

    def changed(self) -> None:
        """A key changed here: this process reloads its keys now, and the others are told to
        (through Redis; without it they reload within ``refresh_interval``)."""
        with self._keys_loading, self.engine.connect() as connection:
            self.directory.load(self.keys.everyone(connection))
        if self._redis is not None:
            try:
                self._redis.publish(self._channel, b"1")
            except _redis_error() as e:  # they reload within refresh_interval anyway
                log.warning("could not announce a key change through Redis: %s", e)

    def _listen(self) -> None:
        pubsub = self._redis.pubsub(ignore_subscribe_messages=True)

        def on_error(error, pubsub, thread):  # Redis away: try again in a while
            log.warning("key change announcements: %s", error)
            self.writer._stop.wait(1.0)

        try:
            pubsub.subscribe(**{self._channel: lambda message: self.writer.wake()})
            self._listener = pubsub.run_in_thread(sleep_time=1.0, daemon=True,
                                                  exception_handler=on_error)
        except _redis_error() as e:
            log.warning("key change announcements off (%s): keys reload every %g s", e,
                        self.settings.refresh_interval)

    # -- the request path: one queued row per proxied request ----------------------------------

    def record(self, req, trace, *, endpoint, status, seconds, overhead_ms, streamed) -> None:
        """One request's row, queued for the writer. A request refused before it was admitted
        (a bad body, an unknown key, a model not allowed, a limit or budget spent) is logged
        but adds nothing to its key's spend; one refused for its key (401) is logged under
        ``unauthenticated``."""
        tenant = req.tenant
        prompt, completion, cached = usage_counts(
            trace.usage if trace.cache not in ("HIT", "STALE") else None)
        hold = trace.budget_hold
        now = self.wall()
        bodies = (None, None)
        if self.redactor is not None and trace.bodies is not None:
            bodies = tuple(self.redactor.text(body, req.client_key) for body in trace.bodies)
        row = (now, req.id, tenant.id if tenant else UNAUTHENTICATED, endpoint,
               _text(trace.model), _text(self._served(trace)), trace.provider, streamed,
               trace.upstream.count, status, trace.cache, prompt, completion, cached,
               trace.cost_usd or 0.0, round(seconds * 1000, 3), round(overhead_ms or 0.0, 3),
               trace.condensed, trace.error_code, *bodies)
        spend_day = (None if trace.admission is None
                     else hold.day if hold is not None and hold.day else day_of(now))
        self.writer.put((row, spend_day))

    def _served(self, trace) -> str:
        if not trace.provider or self.router is None:
            return trace.model
        return self.router.served_name(trace.provider, trace.model)

    # -- the admin API and the CLI ------------------------------------------------------------

    def guarded(self):
        """Around an admin call: a database failure is a 503, not a 500."""
        return unavailable_as_error(self.engine)

    # The reads below first have this process's queued rows written (a second at most), so
    # that a request answered here is in the answers at once; other processes' rows arrive
    # within their database.flush_interval.

    def spend_report(self, **query) -> dict:
        self.writer.flush()
        with self.engine.connect() as connection:
            return spend_module.report(connection, **query)

    def requests_page(self, **query) -> dict:
        self.writer.flush()
        with self.engine.connect() as connection:
            return request_log.page(connection, **query)

    def request(self, request_id: str):
        self.writer.flush()
        with self.engine.connect() as connection:
            row = request_log.one(connection, request_id)
        return None if row is None else request_log.to_json(row)

    def requests_export(self, **query):
        self.writer.flush()
        return request_log.export(self.engine, **query)

    def health(self) -> dict:
        stats = self.writer.stats()
        full = stats["queued"] >= 0.8 * stats["queue_size"]
        failing = stats["failing_for"] is not None or (stats["waiting_for"] or 0) > STALLED
        return {"status": "warning" if failing or full else "healthy",
                "backend": self.backend, "keys": len(self.directory), **stats}

    def close(self) -> None:
        if self._listener is not None:
            self._listener.stop()
        self.writer.close()
        if self._redis is not None:
            self._redis.close()
        self.engine.dispose()


def _text(value: str, limit: int = 200) -> str:
    """A client's text for a column: bounded, and without NUL, which PostgreSQL refuses."""
    return value[:limit].replace("\x00", "")


def actor_of_cli() -> str:
    """Who changes keys from the command line, for the audit trail."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"cli {user}@{socket.gethostname()}"[:200]


def _redis(url: str):
    """The client that announces key changes to the other processes. redis-py is imported only
    when ``REDIS_URL`` is set (8.6 MB of RSS a proxy without Redis does not carry)."""
    import redis
    return redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)


def _redis_error() -> type[Exception]:
    import redis
    return redis.RedisError
