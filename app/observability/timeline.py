"""The console's figures of the last hour: per-second counters of the proxied requests in a
ring buffer, and their exchange through Redis so every process's seconds can be merged.

``Timeline`` keeps 3600 one-second slots in flat columns (no object per second):
requests, errors (status 5xx: the proxy or its providers failed the request), refusals (4xx:
the client's request was refused, a rate limit or budget included), cache hits and lookups
(HIT/STALE of HIT/MISS/STALE; a BYPASS is no lookup), tokens and cost, and two histograms,
the request's latency to its last byte and the proxy's overhead (upstream time excluded). The
histograms use fixed logarithmic buckets (``BUCKETS``, a factor of sqrt(2) apart from
``BASE_MS``), so the seconds of any processes add up bucket by bucket and a percentile read
from the sum is within about 19% of the true one. Seconds are of the wall clock (injected),
so the slots of different processes line up. At most 1.5 MB a process: the columns are
anonymous memory mappings, whose pages take memory only once a second in them is written, so
a proxy that has served little holds little of it.

``Exchange`` (app/observability/timeline_exchange.py) publishes this process's recent seconds
to Redis and gathers the other processes' for the console.
"""

from __future__ import annotations

import logging
import math
import mmap
import struct
import threading
import time
from array import array
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # types only
    from app.observability.timeline_exchange import Exchange

log = logging.getLogger("llm_proxy.timeline")

SLOTS = 3600  # seconds kept
BASE_MS = 0.05  # bucket 0: up to this; bucket i: up to BASE_MS * sqrt(2) ** i
BUCKETS = 48  # the last one (past ~420 s) takes everything longer
# The integer columns of a slot, in this order; the cost (USD) is a column of doubles.
REQUESTS, ERRORS, REFUSED, HITS, LOOKUPS, TOKENS = range(6)
COLUMNS = ("requests", "errors", "refused", "cache_hits", "cache_lookups", "tokens")
WIDTH = len(COLUMNS)
_ROW = struct.Struct("<6Qd2B")  # the columns, cost, and how many latency/overhead buckets follow
_PAIR = struct.Struct("<BI")  # (bucket, count)
_TOP_MS = BASE_MS * 2 ** ((BUCKETS - 1) / 2)  # the last bucket's lower bound


def bucket_of(ms: float) -> int:
    """The histogram bucket of a duration in milliseconds."""
    if not ms > BASE_MS:  # NaN too
        return 0
    if ms >= _TOP_MS:  # infinity too
        return BUCKETS - 1
    return min(BUCKETS - 1, int(math.log2(ms / BASE_MS) * 2) + 1)


def bucket_value(index: int) -> float:
    """What a bucket stands for, in milliseconds: the geometric middle of its bounds."""
    if index == 0:
        return BASE_MS / 2
    return BASE_MS * 2 ** ((index - 0.5) / 2)


def percentile(histogram, q: float) -> float | None:
    """The ``q`` quantile (0 to 1) of a histogram (counts by bucket), in ms; None if empty."""
    total = sum(histogram)
    if not total:
        return None
    rank = max(1, math.ceil(q * total))
    seen = 0
    for index, count in enumerate(histogram):
        seen += count
        if seen >= rank:
            return bucket_value(index)
    return bucket_value(len(histogram) - 1)


class Timeline:
    """This process's last hour, second by second; ``record`` is called once per proxied
    request after its last byte (app/api: ``_finished``). Thread-safe: one lock, held for a
    few array updates, or a copy of the arrays."""

    enabled = True

    def __init__(self, *, wall=time.time, slots: int = SLOTS, exchange: Exchange | None = None):
        self.wall = wall
        self.slots = slots
        self.exchange = exchange
        self._empty()
        self._last = int(wall())  # the newest second held; slots hold (last - slots, last]
        self._day = (self._last // 86400, 0, 0, 0.0)  # (day number, requests, tokens, cost)
        self._lock = threading.Lock()

    # -- the request path -----------------------------------------------------------------

    def record(self, status: int, seconds: float, overhead_ms: float | None, trace,
               cost_usd: float) -> None:
        """One proxied request ended: ``status`` sent, ``seconds`` to its last byte, the
        proxy's ``overhead_ms``, what its ``trace`` found (cache, tokens), its cost."""
        latency = bucket_of(seconds * 1000)
        overhead = bucket_of(overhead_ms) if overhead_ms is not None else None
        cache = trace.cache
        tokens = trace.tokens()
        second = int(self.wall())
        with self._lock:
            if second > self._last:
                self._advance(second)
            elif second <= self._last - self.slots:  # the clock stepped back over an hour
                second = self._last
            slot = second % self.slots
            at = slot * WIDTH
            counts = self._counts
            counts[at + REQUESTS] += 1
            if status >= 500:
                counts[at + ERRORS] += 1
            elif status >= 400:
                counts[at + REFUSED] += 1
            if cache in ("HIT", "STALE", "MISS"):
                counts[at + LOOKUPS] += 1
                if cache != "MISS":
                    counts[at + HITS] += 1
            counts[at + TOKENS] += tokens
            self._cost[slot] += cost_usd
            self._latency[slot * BUCKETS + latency] += 1
            if overhead is not None:
                self._overhead[slot * BUCKETS + overhead] += 1
            day, requests, day_tokens, day_cost = self._day
            if second // 86400 != day:
                day, requests, day_tokens, day_cost = second // 86400, 0, 0, 0.0
            self._day = (day, requests + 1, day_tokens + tokens, day_cost + cost_usd)

    def _empty(self) -> None:
        """Every slot empty: new mappings, untouched (locked, or before any thread sees it)."""
        self._counts = _zeros("q", self.slots * WIDTH)
        self._cost = _zeros("d", self.slots)
        self._latency = _zeros("I", self.slots * BUCKETS)
        self._overhead = _zeros("I", self.slots * BUCKETS)

    def _advance(self, second: int) -> None:
        """Empty the slots of the seconds after the newest one, up to ``second`` (locked)."""
        if second - self._last >= self.slots:
            self._empty()
            self._last = second
            return
        for start, end in _slot_spans(self._last + 1, second + 1, self.slots):
            n = end - start
            self._counts[start * WIDTH:end * WIDTH] = array("q", bytes(8 * n * WIDTH))
            self._cost[start:end] = array("d", bytes(8 * n))
            zeros = array("I", bytes(4 * n * BUCKETS))
            self._latency[start * BUCKETS:end * BUCKETS] = zeros
            self._overhead[start * BUCKETS:end * BUCKETS] = zeros
        self._last = second

    # -- reads ----------------------------------------------------------------------------

    def _copy(self, now: int):
        with self._lock:
            if now > self._last:
                self._advance(now)
            return (self._last, _copied(self._counts), _copied(self._cost),
                    _copied(self._latency), _copied(self._overhead), self._day)

    def series(self, step: int = 30, now: float | None = None) -> Series:
        """The last hour in points of ``step`` seconds, this process's seconds in them."""
        now = int(self.wall() if now is None else now)
        last, counts, cost, latency, overhead, _ = self._copy(now)
        out = Series(now, step, self.slots)
        for index in range(out.points):
            begin, end = out.span(index)
            begin, end = max(begin, last - self.slots + 1), min(end, last + 1)
            for first, stop in _slot_spans(begin, end, self.slots):
                out.add_slots(index, counts, cost, latency, overhead, first, stop)
        return out

    def today(self, now: float | None = None) -> tuple[int, int, float]:
        """(requests, tokens, cost) of this process today (UTC)."""
        day, requests, tokens, cost = self._day
        now = self.wall() if now is None else now
        return (requests, tokens, cost) if int(now) // 86400 == day else (0, 0, 0.0)

    def rows(self, since: int, now: float | None = None) -> tuple[int, list[tuple[int, bytes]]]:
        """(the newest second, [(second, packed row)]) for the seconds from ``since`` on that
        saw a request: what ``Exchange`` publishes. Only those slots are copied under the
        lock (a few seconds' worth every publication); they are packed outside it."""
        now = int(self.wall() if now is None else now)
        pieces = []
        with self._lock:
            if now > self._last:
                self._advance(now)
            last = self._last
            begin = max(since, last - self.slots + 1)
            second = begin
            for first, stop in _slot_spans(begin, last + 1, self.slots):
                pieces.append((second, _copied(self._counts[first * WIDTH:stop * WIDTH]),
                               _copied(self._cost[first:stop]),
                               _copied(self._latency[first * BUCKETS:stop * BUCKETS]),
                               _copied(self._overhead[first * BUCKETS:stop * BUCKETS])))
                second += stop - first
        found = []
        for second, counts, cost, latency, overhead in pieces:
            for offset in range(len(cost)):
                if counts[offset * WIDTH + REQUESTS]:
                    found.append((second + offset,
                                  pack_row(counts, cost, latency, overhead, offset)))
        return last, found

    def close(self) -> None:
        if self.exchange is not None:
            self.exchange.close()


class NullTimeline:
    """What the proxy records into while the console is off: nothing."""

    enabled = False
    exchange = None

    def record(self, status, seconds, overhead_ms, trace, cost_usd):
        pass

    def close(self):
        pass


def _zeros(typecode: str, n: int) -> memoryview:
    """``n`` zeros of ``typecode`` in an anonymous mapping: its pages are the kernel's shared
    zero page until written, so only the seconds that saw a request take memory (an ``array``
    of zeros writes all of it at once)."""
    return memoryview(mmap.mmap(-1, array(typecode).itemsize * n)).cast(typecode)


def _copied(view: memoryview) -> array:
    """A copy of ``view`` (a column or a slice of one), taken under the lock and read after."""
    copy = array(view.format)
    copy.frombytes(view.cast("B"))
    return copy


def _slot_spans(begin: int, end: int, slots: int):
    """The ring's slot ranges [first, stop) holding the seconds [begin, end)."""
    if end <= begin:
        return []
    first = begin % slots
    count = end - begin
    if first + count <= slots:
        return [(first, first + count)]
    return [(first, slots), (0, first + count - slots)]


def pack_row(counts, cost, latency, overhead, slot: int) -> bytes:
    """One second as bytes: its columns, its cost, and the non-empty buckets of each
    histogram as (bucket, count) pairs (a second touches a few buckets of 48)."""
    at = slot * WIDTH
    lat = [(b, c) for b, c in enumerate(latency[slot * BUCKETS:(slot + 1) * BUCKETS]) if c]
    over = [(b, c) for b, c in enumerate(overhead[slot * BUCKETS:(slot + 1) * BUCKETS]) if c]
    parts = [_ROW.pack(*counts[at:at + WIDTH], cost[slot], len(lat), len(over))]
    parts.extend(_PAIR.pack(b, min(c, 0xFFFFFFFF)) for b, c in lat + over)
    return b"".join(parts)


@dataclass
class Point:
    """One point of a chart: ``seconds`` long (the newest may be shorter)."""
    start: int
    seconds: int
    requests: int
    errors: int
    refused: int
    cache_hits: int
    cache_lookups: int
    tokens: int
    cost: float
    latency_p50: float | None
    latency_p99: float | None
    overhead_p50: float | None
    overhead_p99: float | None


class Series:
    """The last hour ending at second ``now``, in ``points`` points of ``step`` seconds
    aligned on multiples of ``step``; the sums of one or more processes' seconds."""

    def __init__(self, now: int, step: int, slots: int = SLOTS):
        if step <= 0 or slots % step:
            raise ValueError("step must divide the hour")
        self.now, self.step = now, step
        self.points = slots // step
        self.end = (now // step + 1) * step  # exclusive
        self.start = self.end - slots
        self.processes = 1
        self._counts = array("q", bytes(8 * self.points * WIDTH))
        self._cost = array("d", bytes(8 * self.points))
        self._latency = array("q", bytes(8 * self.points * BUCKETS))
        self._overhead = array("q", bytes(8 * self.points * BUCKETS))

    def span(self, index: int) -> tuple[int, int]:
        """The seconds [begin, end) of point ``index``, the newest cut at ``now``."""
        begin = self.start + index * self.step
        return begin, min(begin + self.step, self.now + 1)

    def add_slots(self, index, counts, cost, latency, overhead, first, stop) -> None:
        """Add the ring's slots [first, stop) into point ``index`` (column sums in C)."""
        at = index * WIDTH
        if not sum(counts[first * WIDTH + REQUESTS:stop * WIDTH:WIDTH]):
            return
        for column in range(WIDTH):
            self._counts[at + column] += sum(counts[first * WIDTH + column:stop * WIDTH:WIDTH])
        self._cost[index] += sum(cost[first:stop])
        base = index * BUCKETS
        for histogram, into in ((latency, self._latency), (overhead, self._overhead)):
            for bucket in range(BUCKETS):
                total = sum(histogram[first * BUCKETS + bucket:stop * BUCKETS:BUCKETS])
                if total:
                    into[base + bucket] += total

    def add_row(self, second: int, row: bytes) -> None:
        """Add one published second (``pack_row``) of another process; malformed: ignored."""
        if not self.start <= second < self.end:
            return
        index = (second - self.start) // self.step
        try:
            *columns, cost, n_lat, n_over = _ROW.unpack_from(row)
            pairs = list(_PAIR.iter_unpack(row[_ROW.size:]))
        except struct.error:
            return
        if len(pairs) != n_lat + n_over or not math.isfinite(cost):
            return
        at = index * WIDTH
        for column, value in enumerate(columns):
            self._counts[at + column] += value
        self._cost[index] += cost
        base = index * BUCKETS
        for position, (bucket, count) in enumerate(pairs):
            if bucket < BUCKETS:
                into = self._latency if position < n_lat else self._overhead
                into[base + bucket] += count

    def add_series(self, other: Series) -> None:
        """Add the points of ``other`` (of the same step) where they fall in this one."""
        offset = (other.start - self.start) // self.step
        for index in range(other.points):
            into = offset + index
            if not 0 <= into < self.points or not other._counts[index * WIDTH + REQUESTS]:
                continue
            for column in range(WIDTH):
                self._counts[into * WIDTH + column] += other._counts[index * WIDTH + column]
            self._cost[into] += other._cost[index]
            for mine, theirs in ((self._latency, other._latency),
                                 (self._overhead, other._overhead)):
                for bucket in range(BUCKETS):
                    if count := theirs[index * BUCKETS + bucket]:
                        mine[into * BUCKETS + bucket] += count

    def point(self, index: int) -> Point:
        begin, end = self.span(index)
        c = self._counts[index * WIDTH:(index + 1) * WIDTH]
        lat = self._latency[index * BUCKETS:(index + 1) * BUCKETS]
        over = self._overhead[index * BUCKETS:(index + 1) * BUCKETS]
        return Point(begin, max(0, end - begin), *c, self._cost[index],
                     percentile(lat, 0.5), percentile(lat, 0.99),
                     percentile(over, 0.5), percentile(over, 0.99))

    def all_points(self) -> list[Point]:
        return [self.point(i) for i in range(self.points)]

    def totals(self, last_seconds: int | None = None) -> Point:
        """The sums over the hour, or over the points of the last ``last_seconds``."""
        first = 0 if last_seconds is None else max(
            0, self.points - -(-last_seconds // self.step))
        counts = [sum(self._counts[first * WIDTH + c::WIDTH]) for c in range(WIDTH)]
        lat = [sum(self._latency[first * BUCKETS + b::BUCKETS]) for b in range(BUCKETS)]
        over = [sum(self._overhead[first * BUCKETS + b::BUCKETS]) for b in range(BUCKETS)]
        begin = self.start + first * self.step
        return Point(begin, self.now + 1 - begin, *counts, sum(self._cost[first:]),
                     percentile(lat, 0.5), percentile(lat, 0.99),
                     percentile(over, 0.5), percentile(over, 0.99))


def timeline_for(settings, *, wall=time.time):
    """The proxy's timeline: a ``Timeline`` while the console is on (exchanged through Redis
    when ``redis.url`` is set), else a ``NullTimeline``."""
    if not settings.console_on:
        return NullTimeline()
    exchange = None
    if settings.redis.url:
        from app.observability.timeline_exchange import Exchange  # it imports this module

        exchange = Exchange(settings.redis.url, settings.redis.prefix, wall=wall)
    timeline = Timeline(wall=wall, exchange=exchange)
    if exchange is not None:
        exchange.start(timeline)
    return timeline

