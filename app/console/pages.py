"""What the console's overview, providers and cache pages show, read from the components the
proxy built (``LLMProxy``): each page is a dict for its template, whose ``figures`` are also
its JSON view (app/console/figures.py)."""

from __future__ import annotations

import logging
import math

from app.console import figures as fmt
from app.console.charts import chart
from app.console.figures import Figures
from app.errors import ProxyError
from app.store import spend
from app.store.spend import day_of

log = logging.getLogger("llm_proxy.console")
STEP = 30  # seconds per point of the overview's charts: 120 points in the hour


# -- overview -------------------------------------------------------------------------------

def overview(p) -> dict:
    """The last hour's traffic (the timeline: every process's through Redis when it is
    set), today's tokens and cost, this process's memory."""
    now = p.wall()
    timeline = p.timeline
    series = timeline.series(STEP, now)
    scope = _gather(p, series)
    hour = series.totals()
    minute = series.totals(last_seconds=60)
    points = series.all_points()
    out = Figures()
    f = out.fields
    f["rps"] = fmt.rate(minute.requests / minute.seconds if minute.seconds else None)
    f["requests_hour"] = fmt.count(hour.requests)
    f["error_rate"] = fmt.percent(hour.errors / hour.requests if hour.requests else None)
    f["errors_hour"] = fmt.count(hour.errors)
    f["refused_hour"] = fmt.count(hour.refused)
    f["latency_p50"], f["latency_p99"] = fmt.ms(hour.latency_p50), fmt.ms(hour.latency_p99)
    f["overhead_p50"], f["overhead_p99"] = fmt.ms(hour.overhead_p50), fmt.ms(hour.overhead_p99)
    f["cache_hit_rate"] = fmt.percent(hour.cache_hits / hour.cache_lookups
                                      if hour.cache_lookups else None)
    f["cache_lookups_hour"] = fmt.count(hour.cache_lookups)
    f["scope"] = scope
    tokens, cost, source = _today(p, now)
    f["tokens_today"], f["cost_today"], f["today_source"] = fmt.count(tokens), fmt.usd(cost), \
        source
    _memory(p, out)
    f["updated"] = fmt.when(now)

    def per_second(attr):
        return [getattr(pt, attr) / pt.seconds if pt.seconds else None for pt in points]

    charts = {
        "requests": chart({"requests": per_second("requests"), "errors": per_second("errors")},
                          floor=1, label=lambda top: f"{top:g}/s"),
        "errors": chart({"error_rate": [pt.errors / pt.requests * 100 if pt.requests else None
                                        for pt in points]},
                        floor=1, label=lambda top: f"{top:g}%"),
        "latency": chart({"p50": [pt.latency_p50 for pt in points],
                          "p99": [pt.latency_p99 for pt in points]},
                         floor=10, label=fmt.ms),
        "overhead": chart({"p50": [pt.overhead_p50 for pt in points],
                           "p99": [pt.overhead_p99 for pt in points]},
                          floor=1, label=fmt.ms),
    }
    for name, drawn in charts.items():
        f[f"chart-{name}-top"] = drawn["top"]
        for line, d in drawn["paths"].items():
            out.paths[f"chart-{name}-{line}"] = d
    m = p.settings.memory_manager
    return {"figures": out, "charts": list(charts), "processes": series.processes,
            "step": STEP, "memory_threshold": m.memory_threshold_mb,
            "memory_emergency": m.emergency_threshold_mb}


def _gather(p, series) -> str:
    """Add the other processes' seconds (Redis); what the figures cover, in words."""
    exchange = p.timeline.exchange
    if exchange is None:
        workers = p.settings.server.workers
        if workers > 1:
            return (f"this worker only (1 of {workers}): set REDIS_URL to see every worker's "
                    "requests")
        return "this process"
    try:
        exchange.gather(series)
    except exchange.FAILURES as e:
        log.warning("console: the other processes' figures could not be read: %s", e)
        return "this process only: Redis did not answer"
    n = series.processes
    return f"{n} processes (through Redis)" if n > 1 else "this process (the only one in Redis)"


def _today(p, now) -> tuple[int, float, str]:
    """Tokens and cost of the UTC day: the database's spend (every process, kept across
    restarts) when it is on, else the timeline's (since each process started)."""
    day = day_of(now)
    if p.store is not None:
        try:
            total = spend_report(p.store, start=day, end=day, group_by="day")["total"]
            return (total["prompt_tokens"] + total["completion_tokens"], total["cost_usd"],
                    f"the database, {day} (UTC), every process")
        except ProxyError:
            note = "the database did not answer: "
    else:
        note = ""
    _, tokens, cost = p.timeline.today(now)
    exchange = p.timeline.exchange
    if exchange is not None:
        try:
            _, others_tokens, others_cost, n = exchange.today(now)
            return (tokens + others_tokens, cost + others_cost,
                    f"{note}{day} (UTC), {max(n, 1)} processes through Redis, each since it "
                    "started")
        except exchange.FAILURES:
            note += "Redis did not answer: "
    return tokens, cost, f"{note}this process since it started, {day} (UTC)"


def spend_report(store, **query) -> dict:
    """``GET /admin/spend``'s report without first waiting for this process's queued rows to
    be written (``Store.spend_report`` waits up to a second for them): a page refreshed every
    few seconds may lag the writer by its ``database.flush_interval`` instead."""
    with store.guarded(), store.engine.connect() as connection:
        return spend.report(connection, **query)


def _memory(p, out: Figures) -> None:
    memory = p.memory.stats()
    m = p.settings.memory_manager
    rss = memory.get("rss_mb")
    out.fields["rss"] = fmt.mb(rss)
    out.fields["memory_threshold"] = fmt.mb(m.memory_threshold_mb)
    out.fields["emergency_threshold"] = fmt.mb(m.emergency_threshold_mb)
    out.fields["pressure"] = memory.get("pressure") or "normal"
    out.states["pressure"] = out.fields["pressure"]
    out.values["rss"] = f"{rss or 0:.1f}"


# -- providers ------------------------------------------------------------------------------

def providers(p) -> dict:
    """Each provider: its breaker, its model breakers keeping calls away, its bulkhead, and
    its calls (this process's since start: breakers are shared through Redis when set)."""
    snapshot = p.breakers.snapshot()
    open_models = p.breakers.open_models()
    latency = _upstream_latency(p.metrics)
    names = fmt.slugs(a.name for a in p.providers)
    out = Figures()
    rows = []
    for adapter in p.providers:
        s = adapter.settings
        name, slug = adapter.name, names[adapter.name]
        snap = snapshot[name]
        bulkhead = p.bulkheads[name]
        key = f"provider-{slug}"
        f = out.fields
        f[f"{key}-state"] = snap["state"].replace("_", "-")
        out.states[f"{key}-state"] = snap["state"]
        f[f"{key}-failures"] = f"{snap['failures']} of {snap['threshold']}"
        f[f"{key}-success_rate"] = (fmt.percent(snap["success_rate"]) if snap["calls_in_window"]
                                    else fmt.DASH)  # no call yet: no rate
        f[f"{key}-calls_in_window"] = fmt.count(snap["calls_in_window"])
        f[f"{key}-retry_in"] = fmt.seconds(snap["retry_in"]) if snap["retry_in"] else fmt.DASH
        f[f"{key}-in_flight"] = f"{bulkhead.in_flight} of {bulkhead.limit}"
        out.values[f"{key}-in_flight"] = str(bulkhead.in_flight)
        calls, p50, p99 = latency.get(name, (None, None, None))
        stats = adapter.http.stats.snapshot() if adapter.http is not None else None
        f[f"{key}-latency"] = (f"{fmt.ms(p50)} / {fmt.ms(p99)}" if calls else fmt.DASH)
        f[f"{key}-calls"] = fmt.count(stats["requests_total"] if stats else calls)
        f[f"{key}-errors"] = fmt.count(stats["errors_total"]) if stats else fmt.DASH
        models = []
        for model, m in sorted(open_models.get(name, {}).items())[:50]:
            models.append({"name": model, "state": m["state"],
                           "failures": m["failures"], "retry_in": fmt.seconds(m["retry_in"])})
        rows.append({"name": name, "slug": slug, "type": s.type, "enabled": s.enabled,
                     "priority": s.priority, "weight": s.weight, "limit": bulkhead.limit,
                     "models": models, "more_models": max(0, len(open_models.get(name, {}))
                                                          - len(models))})
    return {"figures": out, "providers": rows, "shared": p.shared is not None}


def _upstream_latency(metrics) -> dict[str, tuple[int, float | None, float | None]]:
    """provider -> (calls, p50 ms, p99 ms) of ``llm_proxy_upstream_latency_seconds`` (this
    process since start), interpolated within its buckets as Prometheus's
    histogram_quantile does; {} while metrics are off."""
    if not metrics.enabled:
        return {}
    buckets: dict[str, list[tuple[float, float]]] = {}
    for family in metrics.upstream_latency.collect():
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                buckets.setdefault(sample.labels["provider"], []).append(
                    (float(sample.labels["le"]), sample.value))
    found = {}
    for provider, cumulative in buckets.items():
        cumulative.sort()
        total = cumulative[-1][1] if cumulative else 0
        if total:
            found[provider] = (int(total), _quantile(cumulative, 0.5) * 1000,
                               _quantile(cumulative, 0.99) * 1000)
    return found


def _quantile(cumulative: list[tuple[float, float]], q: float) -> float:
    total = cumulative[-1][1]
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, seen in cumulative:
        if seen >= rank:
            if math.isinf(bound):  # past the last bucket: its lower bound is all we know
                return lower_bound
            inside = seen - lower_count
            share = (rank - lower_count) / inside if inside else 1.0
            return lower_bound + (bound - lower_bound) * share
        lower_bound, lower_count = bound, seen
    return lower_bound


# -- cache ----------------------------------------------------------------------------------

CACHES = ("response", "summary")


def cache(p) -> dict:
    """Both caches: entries, bytes against the budget, hit rate, evictions (this process's,
    or Redis's entries with the shared caches)."""
    stats = p.caches.stats()
    out = Figures()
    rows = []
    for name in CACHES:
        s = stats[f"{name}_cache"]
        key = f"cache-{name}"
        f = out.fields
        f[f"{key}-entries"] = f"{fmt.count(s['entries'])} of {fmt.count(s['max_entries'])}"
        f[f"{key}-bytes"] = f"{fmt.size(s['bytes'])} of {fmt.size(s['max_bytes'])}"
        out.values[f"{key}-bytes"] = str(s["bytes"])
        f[f"{key}-hit_rate"] = fmt.percent(s["hit_rate"] if s["hits"] + s["misses"] else None)
        f[f"{key}-hits"] = fmt.count(s["hits"])
        f[f"{key}-misses"] = fmt.count(s["misses"])
        f[f"{key}-evictions"] = fmt.count(s["evictions"])
        f[f"{key}-expirations"] = fmt.count(s["expirations"])
        rows.append({"name": name, "max_bytes": s["max_bytes"],
                     "backend": s.get("backend", "memory")})
    return {"figures": out, "caches": rows, "enabled": p.settings.cache.enabled}
