"""Budgets: what each key has spent (the database's totals, plus what this process settled
and has not written yet, plus what its requests in flight have reserved), checked at
admission; and the spend report the admin API answers from the database.

The bound. A request is admitted while the key's spend plus its reservations in flight is under
every budget, and it reserves its estimated cost (``PriceTable.estimate``: its prompt and the
most it may answer, at the dearer of the model's two rates). So the requests one process admits
can overshoot a budget by at most one request's estimate (the last one admitted) plus what
answers cost beyond their estimates. Several processes each see the others' spend once it is
written and re-read (``database.flush_interval``, then the writer's reload of the spend totals,
every second while keys have budgets): each may overshoot by what it admits in that time. A model without a price costs 0 and never exhausts a
budget.
"""

from __future__ import annotations

import calendar
import functools
import logging
import math
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import sqlalchemy as sa

from app.errors import BudgetExceeded
from app.store.schema import spend

log = logging.getLogger("llm_proxy.store")
PERIODS = ("daily", "monthly", "total")


@dataclass(frozen=True)
class Budget:
    """USD a key may spend per UTC day, per UTC month and in all; None: no such budget.
    ``soft_limit_percent``: past this share of a budget, a warning and a metric, no refusal."""
    daily_usd: float | None = None
    monthly_usd: float | None = None
    total_usd: float | None = None
    soft_limit_percent: float | None = None

    def limits(self) -> list[tuple[str, float]]:
        return [(p, v) for p, v in zip(PERIODS, (self.daily_usd, self.monthly_usd,
                                                 self.total_usd)) if v is not None]

    def to_json(self) -> dict:
        return {"daily_usd": self.daily_usd, "monthly_usd": self.monthly_usd,
                "total_usd": self.total_usd, "soft_limit_percent": self.soft_limit_percent}


def day_of(wall: float) -> str:
    """The UTC day of ``wall``, YYYY-MM-DD (asked on every request: the last ones are kept)."""
    return _day(int(wall // 86400))


@functools.lru_cache(maxsize=8)
def _day(number: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(number * 86400))


def resets_at(period: str, wall: float) -> float | None:
    """When ``period`` starts over after ``wall`` (UTC); None for the total."""
    t = time.gmtime(wall)
    if period == "daily":
        return calendar.timegm((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0)) + 86400
    if period == "monthly":
        year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
        return calendar.timegm((year, month, 1, 0, 0, 0))
    return None


def usd(amount: float) -> str:
    """An amount as people write it: 5, 0.25, 0.00001 (not 1e-05)."""
    return f"{amount:.8f}".rstrip("0").rstrip(".") or "0"


def iso(wall: float | None) -> str | None:
    if wall is None:
        return None
    return datetime.fromtimestamp(wall, timezone.utc).isoformat().replace("+00:00", "Z")


@dataclass
class Hold:
    """One admitted request's reservation against its key's budgets."""
    key_id: str
    usd: float
    day: str = ""  # the day its cost was settled on (its request log row's spend day)


class _KeySpend:
    __slots__ = ("base_days", "base_total", "local_days", "held", "warned")

    def __init__(self):
        self.base_days: dict[str, float] = {}  # this month's days, from the database
        self.base_total = 0.0
        self.local_days: dict[str, float] = {}  # settled here, not written yet
        self.held = 0.0  # reserved by requests in flight here
        self.warned: set[tuple[str, str]] = set()  # (period, its day or month) soft-warned

    def spent(self, today: str, periods=PERIODS) -> dict[str, float]:
        """USD spent today, this month and in all (only ``periods``: each costs a sum)."""
        out = {}
        if "daily" in periods:
            out["daily"] = self.base_days.get(today, 0.0) + self.local_days.get(today, 0.0)
        if "monthly" in periods:
            month = today[:7]
            out["monthly"] = (
                sum(v for d, v in self.base_days.items() if d.startswith(month))
                + sum(v for d, v in self.local_days.items() if d.startswith(month)))
        if "total" in periods:
            out["total"] = self.base_total + sum(self.local_days.values())
        return out


class SpendLedger:
    """Per key with a budget: its spend as this process knows it, and the admission check."""

    def __init__(self, *, wall=time.time):
        self.wall = wall
        self.metrics = None  # set by LLMProxy.attach_metrics
        self._keys: dict[str, _KeySpend] = {}
        self._lock = threading.Lock()

    def _of(self, key_id: str) -> _KeySpend:
        found = self._keys.get(key_id)
        if found is None:
            found = self._keys[key_id] = _KeySpend()
        return found

    def hold(self, tenant, estimate_usd: float) -> Hold | None:
        """Reserve ``estimate_usd`` for a request of ``tenant``; BudgetExceeded (429) when a
        budget is spent, counting what is in flight. None for a key without a budget."""
        budget = tenant.budget
        if budget is None:
            return None
        now = self.wall()
        limits = budget.limits()
        with self._lock:
            state = self._of(tenant.id)
            spent = state.spent(day_of(now), [period for period, _ in limits])
            for period, limit in limits:
                if spent[period] + state.held >= limit:
                    break
            else:
                state.held += estimate_usd
                return Hold(tenant.id, estimate_usd)
        if self.metrics is not None:
            self.metrics.budget_refused(tenant.id, period)
        reset = resets_at(period, now)
        when = (f"It resets at {iso(reset)}." if reset is not None
                else "It does not reset: raise the budget to go on.")
        headers = {"Retry-After": str(max(1, math.ceil(reset - now)))} if reset else {}
        if reset is not None:
            headers["X-Budget-Reset"] = iso(reset)
        raise BudgetExceeded(f"API key {tenant.id!r} has spent its {period} budget of "
                             f"{usd(limit)} USD. {when}", headers=headers)

    def settle(self, hold: Hold, tenant, cost_usd: float) -> None:
        """The request ended having cost ``cost_usd``: its reservation goes, its cost counts
        (until the writer has written it: ``written``); a soft limit crossed is reported."""
        now = self.wall()
        hold.day = today = day_of(now)
        budget = tenant.budget
        watched = ([p for p, _ in budget.limits()]
                   if budget is not None and budget.soft_limit_percent is not None else ())
        with self._lock:
            state = self._of(hold.key_id)
            before = state.spent(today, watched) if watched else None
            state.held = max(0.0, state.held - hold.usd)
            state.local_days[today] = state.local_days.get(today, 0.0) + cost_usd
            if not watched:
                return
            after = state.spent(today, watched)
            crossed = self._crossed(state, budget, before, after, today)
        for period, limit, threshold in crossed:
            log.warning("API key %r passed %g%% of its %s budget (%s of %s USD)", hold.key_id,
                        budget.soft_limit_percent, period, usd(after[period]), usd(limit))
            if self.metrics is not None:
                self.metrics.budget_soft_limit(hold.key_id, period)

    @staticmethod
    def _crossed(state, budget, before, after, today):
        if budget is None or budget.soft_limit_percent is None:
            return []
        out = []
        for period, limit in budget.limits():
            threshold = limit * budget.soft_limit_percent / 100
            span = {"daily": today, "monthly": today[:7], "total": ""}[period]
            if before[period] < threshold <= after[period] and (period, span) not in state.warned:
                state.warned.add((period, span))
                out.append((period, limit, threshold))
        return out

    def release(self, hold: Hold) -> None:
        """The request cost nothing it could be charged for (refused before it was sent)."""
        with self._lock:
            state = self._of(hold.key_id)
            state.held = max(0.0, state.held - hold.usd)

    def written(self, key_id: str, day: str, cost_usd: float) -> None:
        """The writer wrote a settled cost: it is the database's now, until the next load."""
        with self._lock:
            state = self._keys.get(key_id)
            if state is None or day not in state.local_days:
                return
            state.local_days[day] -= cost_usd
            if abs(state.local_days[day]) < 1e-12:
                del state.local_days[day]
            if day[:7] == day_of(self.wall())[:7]:
                state.base_days[day] = state.base_days.get(day, 0.0) + cost_usd
            state.base_total += cost_usd

    def load(self, days: dict[str, dict[str, float]], totals: dict[str, float]) -> None:
        """The database's spend (this month's days, and all time) for every key."""
        with self._lock:
            for key_id in set(self._keys) | set(totals):
                state = self._of(key_id)
                state.base_days = days.get(key_id, {})
                state.base_total = totals.get(key_id, 0.0)

    def spent(self, key_id: str) -> dict[str, float]:
        with self._lock:
            state = self._keys.get(key_id)
            return (state.spent(day_of(self.wall())) if state is not None
                    else dict.fromkeys(PERIODS, 0.0))


def load_totals(connection, wall: float) -> tuple[dict, dict]:
    """(key -> day -> USD for this month's days, key -> USD in all) from the spend table."""
    month_start = day_of(wall)[:7] + "-01"
    days: dict[str, dict[str, float]] = {}
    rows = connection.execute(
        sa.select(spend.c.key_id, spend.c.day, sa.func.sum(spend.c.cost_usd))
        .where(spend.c.day >= month_start).group_by(spend.c.key_id, spend.c.day))
    for key_id, day, usd in rows:
        days.setdefault(key_id, {})[day] = float(usd or 0.0)
    totals = {key_id: float(usd or 0.0) for key_id, usd in connection.execute(
        sa.select(spend.c.key_id, sa.func.sum(spend.c.cost_usd)).group_by(spend.c.key_id))}
    return days, totals


GROUPS = {"day": spend.c.day, "model": spend.c.model, "key": spend.c.key_id}


def report(connection, *, key_id=None, model=None, start=None, end=None,
           group_by="day") -> dict:
    """GET /admin/spend: the spend table summed by ``group_by`` over the days ``start`` to
    ``end`` (inclusive, YYYY-MM-DD), for one key and model when given."""
    column = GROUPS[group_by]
    sums = [sa.func.sum(spend.c.requests), sa.func.sum(spend.c.prompt_tokens),
            sa.func.sum(spend.c.completion_tokens), sa.func.sum(spend.c.cached_tokens),
            sa.func.sum(spend.c.cost_usd)]
    query = sa.select(column, *sums).group_by(column).order_by(column)
    if key_id is not None:
        query = query.where(spend.c.key_id == key_id)
    if model is not None:
        query = query.where(spend.c.model == model)
    if start is not None:
        query = query.where(spend.c.day >= start)
    if end is not None:
        query = query.where(spend.c.day <= end)
    name = "key_id" if group_by == "key" else group_by
    rows = [{name: group, **_sums(values)} for group, *values in connection.execute(query)]
    total = _sums([sum(r[f] for r in rows) for f in _SUM_FIELDS])
    return {"group_by": group_by, "from": start, "to": end, "key_id": key_id, "model": model,
            "data": rows, "total": total}


_SUM_FIELDS = ("requests", "prompt_tokens", "completion_tokens", "cached_tokens", "cost_usd")


def _sums(values) -> dict:
    out = {f: int(v or 0) for f, v in zip(_SUM_FIELDS[:4], values)}
    out["cost_usd"] = round(float(values[4] or 0.0), 10)
    return out
