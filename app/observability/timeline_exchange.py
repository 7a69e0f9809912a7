"""The console's timeline across processes: each process publishes its recent seconds to Redis
from a background thread (every ``PUBLISH_INTERVAL`` seconds, kept an hour), and the console
gathers the other processes' seconds and today's totals, to merge with its own
(app/observability/timeline.py)."""

from __future__ import annotations

import logging
import os
import secrets
import socket
import struct
import threading
import time

import redis

from app.observability.timeline import SLOTS, Series, Timeline

log = logging.getLogger("llm_proxy.timeline")

PUBLISH_INTERVAL = 2.0
FINAL_AFTER = 15  # seconds after a minute's end by which every process has published it
MAX_PROCESSES = 64  # processes merged at most (the most recently published)
_DAY = struct.Struct("<QQd")  # today's requests, tokens and cost


class Exchange:
    """This process's seconds in Redis, and the other processes' read back.

    Keys, under the deployment's prefix: ``console:timeline:processes`` (a sorted set of
    process ids by their last publication), ``console:timeline:{id}:{minute}`` (a hash of that
    minute's seconds that saw a request, packed; an hour's life) and ``console:today:{day}``
    (each process's totals of that UTC day). A client of its own with short timeouts: its
    reads of an hour of seconds may take longer than the request path's Redis calls may, and
    a slow read here must not count against Redis's health for the caches and limits.
    """

    FAILURES = (redis.RedisError, OSError)  # what a call to Redis may raise

    def __init__(self, url: str, prefix: str, *, wall=time.time,
                 interval: float = PUBLISH_INTERVAL, client=None):
        self.prefix = f"{prefix}console:"
        self.wall = wall
        self.interval = interval
        self.id = f"{socket.gethostname()[:40]}:{os.getpid()}:{secrets.token_hex(3)}"
        self.client = client or redis.Redis.from_url(url, socket_timeout=1.0,
                                                     socket_connect_timeout=1.0)
        self.timeline: Timeline | None = None
        self._published = 0  # the newest second published
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False
        # (process id, minute, step) -> that minute of that process, summed (``gather``)
        self._minutes: dict[tuple[str, int, int], Series] = {}
        self._lock = threading.Lock()

    def start(self, timeline: Timeline) -> None:
        self.timeline = timeline
        self._thread = threading.Thread(target=self._run, name="console-timeline", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.publish()
                if self._failing:
                    log.warning("console timeline: Redis answers again")
                self._failing = False
            except Exception as e:  # noqa: BLE001 - a failed tick must not end the thread
                if not self._failing:
                    log.warning("console timeline: cannot publish to Redis (%s): the console "
                                "shows this process's figures only", e)
                self._failing = True

    def publish(self) -> int:
        """Write the seconds since the last publication (the last one again: it may have
        grown); the number of seconds written."""
        timeline = self.timeline
        now = int(self.wall())
        last, rows = timeline.rows(max(self._published - 1, now - SLOTS + 1), now)
        requests, tokens, cost = timeline.today(now)
        if not rows and not requests:
            self._published = last
            return 0
        pipe = self.client.pipeline(transaction=False)
        by_minute: dict[int, dict[str, bytes]] = {}
        for second, row in rows:
            by_minute.setdefault(second // 60, {})[str(second)] = row
        for minute, fields in by_minute.items():
            key = f"{self.prefix}timeline:{self.id}:{minute}"
            pipe.hset(key, mapping=fields)
            pipe.expire(key, SLOTS + 120)
        day_key = f"{self.prefix}today:{now // 86400}"
        pipe.hset(day_key, self.id, _DAY.pack(requests, tokens, cost))
        pipe.expire(day_key, 2 * 86400)
        processes = f"{self.prefix}timeline:processes"
        pipe.zadd(processes, {self.id: now})
        pipe.zremrangebyscore(processes, "-inf", now - SLOTS)
        pipe.execute()
        self._published = last
        return len(rows)

    def gather(self, series: Series) -> int:
        """Add the other processes' seconds of the series' hour into it; how many processes
        were added. Raises RedisError when Redis does not answer.

        A minute over (``FINAL_AFTER`` seconds past its end: every process has published it)
        no longer changes, so each process's is read and summed once, then kept here as the
        series' points for that minute; a refresh reads only the newest minute or two of each
        process. Reading an hour of four busy processes' seconds took about 100 ms; once
        summed, a refresh takes a few."""
        processes = f"{self.prefix}timeline:processes"
        ids = [raw.decode() for raw in self.client.zrevrangebyscore(
            processes, "+inf", series.start, start=0, num=MAX_PROCESSES)]
        ids = [i for i in ids if i != self.id]
        if not ids:
            return 0
        step = series.step
        keep = 60 % step == 0  # a minute is whole points
        final = (series.now - FINAL_AFTER) // 60  # the minutes before this one are over
        first = series.start // 60
        wanted = []
        with self._lock:
            for stale in [k for k in self._minutes if k[1] < first or k[2] != step]:
                del self._minutes[stale]
            for pid in ids:
                for minute in range(first, series.now // 60 + 1):
                    summed = self._minutes.get((pid, minute, step)) if keep else None
                    if summed is not None:
                        series.add_series(summed)
                    else:
                        wanted.append((pid, minute))
        pipe = self.client.pipeline(transaction=False)
        for pid, minute in wanted:
            pipe.hgetall(f"{self.prefix}timeline:{pid}:{minute}")
        for (pid, minute), fields in zip(wanted, pipe.execute()):
            into = Series(minute * 60 + 59, step, 60) if keep else series
            for second, row in fields.items():
                try:
                    into.add_row(int(second), row)
                except ValueError:
                    continue
            if keep:
                series.add_series(into)
                if minute < final:
                    with self._lock:
                        self._minutes[(pid, minute, step)] = into
        series.processes += len(ids)
        return len(ids)

    def today(self, now: float) -> tuple[int, int, float, int]:
        """(requests, tokens, cost, processes) of every process today, from Redis."""
        found = self.client.hgetall(f"{self.prefix}today:{int(now) // 86400}")
        requests = tokens = 0
        cost = 0.0
        for pid, raw in found.items():
            try:
                r, t, c = _DAY.unpack(raw)
            except struct.error:
                continue
            if pid.decode(errors="replace") == self.id:
                continue  # this process's own, fresher, is added by the caller
            requests, tokens, cost = requests + r, tokens + t, cost + c
        return requests, tokens, cost, len(found)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=3)
        try:
            if self.timeline is not None:
                self.publish()  # the last seconds, so the others see them within the hour
        except Exception:  # noqa: BLE001 - stopping: Redis may be gone
            pass
        self.client.close()
