"""The store's one background thread: it writes the queued request log rows and their spend in
batches, reloads the keys and spend totals the request path reads, and deletes old log rows.

The request path only ever puts a row in a bounded queue (``put``: never blocks). When the
database is slow or down the thread keeps retrying its batch with a growing pause, the queue
fills, and each row that finds it full is dropped, counted (``dropped``) and logged; the proxied
requests themselves are served as ever. A batch that could not be written when the proxy stops
is counted as dropped too: nothing is lost without a count.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import defaultdict

import sqlalchemy as sa

from app.store.database import failure
from app.store.request_log import (CACHED, COLUMNS, COMPLETION, COST, KEY_ID, MODEL, PROMPT,
                                   delete_before)
from app.store.schema import spend

log = logging.getLogger("llm_proxy.store")
SPEND_SUMS = ("requests", "prompt_tokens", "completion_tokens", "cached_tokens", "cost_usd")
RETENTION_INTERVAL = 3600.0  # seconds between deletes of old request log rows
SPEND_RELOAD = 1.0  # seconds between reloads of the spend totals, while keys have budgets
MAX_BACKOFF = 5.0
DROP_LOG_INTERVAL = 10.0  # at most one "rows dropped" line per this many seconds


class Writer:
    def __init__(self, engine, ledger, *, refresh, settings, reload_spend=lambda: None,
                 clock=time.monotonic,
                 wall=time.time, prepare=lambda: None):
        self.engine = engine
        self.ledger = ledger  # SpendLedger: told what was written
        self.refresh = refresh  # reloads keys and spend totals (Store.refresh)
        # reloads the spend totals alone, more often: what other processes spent reaches this
        # one's budgets within about a second (Store.reload_spend)
        self.reload_spend = reload_spend
        # Before each write: the schema there (Store.ready: migrations start-up could not run)
        self.prepare = prepare
        self.settings = settings  # DatabaseSettings
        self.clock = clock
        self.wall = wall
        self.queue: queue.Queue = queue.Queue(maxsize=settings.queue_size)
        self.written = 0
        self.dropped = 0
        self.failing_since: float | None = None  # a write or load failing now, since when
        self.last_error = ""
        self.last_refresh: float | None = None
        self._busy_since: float | None = None  # the database call under way, since when
        self._dropped_logged = (0, -DROP_LOG_INTERVAL)  # (count, when) last logged
        self._lock = threading.Lock()
        self._wake = threading.Event()  # reload keys and spend now
        self._nudge = threading.Event()  # write what is queued now, without filling a batch
        self._progress = threading.Condition()  # notified after each batch written or dropped
        self.accepted = 0  # rows put in the queue so far
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        stmt = _upsert_for(engine.dialect.name)(spend)
        names = ", ".join(COLUMNS)
        self._copy = f"COPY requests ({names}) FROM STDIN"
        marks = ", ".join("?" * len(COLUMNS))
        self._insert_sql = f"INSERT INTO requests ({names}) VALUES ({marks})"
        self._upsert = stmt.on_conflict_do_update(
            index_elements=[spend.c.key_id, spend.c.day, spend.c.model],
            set_={name: spend.c[name] + stmt.excluded[name] for name in SPEND_SUMS})

    def put(self, row: tuple) -> None:
        """Queue one request's row (its ``request_log.COLUMNS``, and the day its cost counts
        on, None for none); never blocks: a full queue drops it, counted and logged."""
        try:
            self.queue.put_nowait(row)
        except queue.Full:
            self._drop(1, "the queue is full")
        self.accepted += 1

    def wake(self) -> None:
        """Reload keys and spend now (a key changed here or on another process)."""
        self._wake.set()
        self._nudge.set()

    def flush(self, timeout: float = 1.0) -> bool:
        """Write the rows queued so far now, and wait up to ``timeout`` seconds for them (the
        admin API reads its own writes: a request answered, then looked up at once). Whether
        they were written (or dropped) in time."""
        target = self.accepted
        self._nudge.set()
        with self._progress:
            return self._progress.wait_for(lambda: self.written + self.dropped >= target,
                                           timeout)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 3.0) -> None:
        """Stop: write what is queued if the database answers within ``timeout`` seconds;
        what is left is counted as dropped."""
        self._stop.set()
        self._nudge.set()
        if self._thread is not None:
            self._thread.join(timeout)
        left = self.queue.qsize()
        if left:
            self._drop(left, "the proxy stopped before they were written")

    def stats(self) -> dict:
        now = self.clock()
        return {"queued": self.queue.qsize(), "queue_size": self.settings.queue_size,
                "written": self.written, "dropped": self.dropped,
                "failing_for": None if self.failing_since is None
                else round(now - self.failing_since, 1),
                "last_error": self.last_error or None,
                "waiting_for": None if self._busy_since is None
                else round(now - self._busy_since, 1),
                "last_refresh_age": None if self.last_refresh is None
                else round(now - self.last_refresh, 1)}

    def _run(self):
        """The thread: it never dies of a bug while the proxy serves (rows would pile up
        unwritten and uncounted); the bug is logged and the loop goes on."""
        while True:
            try:
                return self._loop()
            except Exception:  # noqa: BLE001 - logged with its traceback, then served on
                log.exception("database writer: unexpected error; going on")
                if self._stop.wait(1.0):
                    return

    def _loop(self):
        batch: list[tuple] = []  # a batch not written yet: retried before newer rows
        backoff = 0.0
        next_refresh = next_spend = next_retention = 0.0
        while True:
            stopping = self._stop.is_set()
            if not batch:
                batch = self._take(0 if stopping else min(
                    self.settings.flush_interval, max(0.0, next_refresh - self.clock())))
            if batch:
                written = self._guarded(self._write, batch)
                if written:
                    batch, backoff = [], 0.0
                elif written is None:  # refused: one row at a time, to keep all but the bad
                    refused = sum(not self._guarded(self._write, [row]) for row in batch)
                    if refused:
                        self._drop(refused, "the database refused them (see the error above)")
                    batch = []
                elif stopping:
                    self._drop(len(batch), "the database failed as the proxy stopped")
                    return
                else:
                    backoff = min(MAX_BACKOFF, max(0.1, backoff * 2))
                    self._stop.wait(backoff)
                    continue
            elif stopping:
                return
            now = self.clock()
            if self._wake.is_set() or now >= next_refresh:
                self._wake.clear()
                if self._guarded(self.refresh):
                    self.last_refresh = now
                next_refresh = now + self.settings.refresh_interval
                next_spend = now + SPEND_RELOAD
            elif now >= next_spend:
                self._guarded(self.reload_spend)
                next_spend = now + SPEND_RELOAD
            if self.settings.retention_days and now >= next_retention:
                before = self.wall() - self.settings.retention_days * 86400
                if self._guarded(self._retain, before):
                    next_retention = now + RETENTION_INTERVAL

    def _take(self, wait: float) -> list[tuple]:
        """Up to a batch of rows: waits ``wait`` seconds for the first, then lets the rest of a
        batch arrive for up to one flush interval (many requests, one transaction)."""
        try:
            first = self.queue.get(timeout=wait) if wait > 0 else self.queue.get_nowait()
        except queue.Empty:
            return []
        rows = [first]
        if self.queue.qsize() < self.settings.batch_size and not self._stop.is_set():
            self._nudge.wait(self.settings.flush_interval)
            self._nudge.clear()
        while len(rows) < self.settings.batch_size:
            try:
                rows.append(self.queue.get_nowait())
            except queue.Empty:
                break
        return rows

    def _guarded(self, work, *args) -> bool | None:
        """Run ``work``: True when done; False when the database failed (recorded for
        /health, logged when it starts, not on every retry); None when it refused what it was
        given or the code failed: retrying would fail the same way."""
        self._busy_since = self.clock()
        try:
            work(*args)
        except (sa.exc.DataError, sa.exc.IntegrityError, ValueError, TypeError) as e:
            self._busy_since = None
            log.error("database: %s", failure(e))
            return None
        except sa.exc.SQLAlchemyError as e:
            self._busy_since = None
            self.last_error = failure(e)
            if self.failing_since is None:
                self.failing_since = self.clock()
                log.error("database: %s; requests are served, their rows wait in the queue "
                          "(%d of %d)", self.last_error, self.queue.qsize(),
                          self.settings.queue_size)
            return False
        self._busy_since = None
        if self.failing_since is not None:
            log.warning("database: back after %.1f s", self.clock() - self.failing_since)
            self.failing_since, self.last_error = None, ""
        return True

    def _write(self, rows: list[tuple]) -> None:
        """One transaction: the request log rows, and what they add to each key's spend (a
        request refused before admission spends nothing). PostgreSQL takes the rows by COPY,
        SQLite by one prepared INSERT: a third of SQLAlchemy's per-row CPU, which the request
        threads share."""
        sums: dict[tuple, list] = defaultdict(lambda: [0, 0, 0, 0, 0.0])
        settled: dict[tuple, float] = defaultdict(float)
        for row, day in rows:
            if day is None:
                continue
            total = sums[row[KEY_ID], day, row[MODEL]]
            total[0] += 1
            total[1] += row[PROMPT]
            total[2] += row[COMPLETION]
            total[3] += row[CACHED]
            total[4] += row[COST]
            settled[row[KEY_ID], day] += row[COST]
        self.prepare()
        with self.engine.begin() as connection:
            if self.settings.request_log:
                self._insert(connection, [row for row, _ in rows])
            if sums:
                connection.execute(self._upsert, [
                    {"key_id": key_id, "day": day, "model": model,
                     **dict(zip(SPEND_SUMS, total))} for (key_id, day, model), total in sums.items()])
        for (key_id, day), usd in settled.items():
            self.ledger.written(key_id, day, usd)
        with self._progress:
            self.written += len(rows)
            self._progress.notify_all()

    def _insert(self, connection, rows: list[tuple]) -> None:
        if connection.dialect.name == "postgresql":
            with connection.connection.driver_connection.cursor() as cursor:
                with cursor.copy(self._copy) as copy:
                    for row in rows:
                        copy.write_row(row)
        else:
            connection.exec_driver_sql(self._insert_sql, rows)

    def _retain(self, before: float) -> None:
        with self.engine.begin() as connection:
            deleted = delete_before(connection, before)
        if deleted:
            log.info("request log: %d rows older than %g days deleted", deleted,
                     self.settings.retention_days)

    def _drop(self, count: int, why: str) -> None:
        with self._lock, self._progress:
            self.dropped += count
            self._progress.notify_all()
            total = self.dropped
            logged, when = self._dropped_logged
            now = self.clock()
            if now - when < DROP_LOG_INTERVAL and self._stop.is_set() is False:
                return
            self._dropped_logged = (total, now)
        log.error("request log: %d rows dropped (%d in all): %s", total - logged, total, why)


def _upsert_for(dialect: str):
    """The dialect's INSERT with ON CONFLICT, imported for the engine in use only: the other
    dialect's package costs memory (PostgreSQL's about 2 MB) for the life of the process."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert
