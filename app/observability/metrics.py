"""Prometheus metrics: the exporter's HTTP metrics plus the proxy's own, and the same as JSON.

Per-request figures (upstream calls, errors, latency, tokens, stream durations, cache results)
are counted as they happen; state (caches, breakers, in flight, memory, GC) is read from the
components when Prometheus scrapes, so it costs nothing per request. Every label is bounded:
providers and kinds are fixed sets, and models are names the proxy serves (never one a client
made up: ``_model_label``), capped at ``MAX_MODELS``.
"""

from __future__ import annotations

import fnmatch
import gc
import os
import threading
import time

import psutil
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_flask_exporter import PrometheusMetrics

from app.pricing import PRICES_AS_OF
from app.upstream.client import combined_stats
from app.runtime.server import REJECTION_REASONS
from app.runtime.supervision import read_state

MAX_MODELS = 200
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}
PRESSURE_LEVELS = {"normal": 0, "high": 1, "critical": 2}


class NullMetrics:
    """What the proxy calls when metrics are off (``METRICS_ENABLED=false``): nothing."""

    enabled = False

    def upstream_call(self, provider, seconds, outcome):
        pass

    def http_request(self, method, url_rule, status, seconds):
        pass

    def request_done(self, trace, seconds, streamed):
        pass

    def rejected(self, reason):
        pass

    def answer_cost(self, key_id, trace, cost):
        pass

    def budget_refused(self, key_id, period):
        pass

    def budget_soft_limit(self, key_id, period):
        pass


class ProxyMetrics:
    """The proxy's metrics on a registry of its own (so tests can build many apps)."""

    enabled = True

    def __init__(self, app, llm_proxy, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.proxy = llm_proxy
        # The exporter's own per-request hooks cost about 48 us a request (a quarter of a cache
        # hit: LocalProxy look-ups and labels(**kwargs) on every request), so its defaults are
        # off and the same two series are recorded below, after the last byte, from children
        # kept per label set; a stream's duration is then whole, not time to headers.
        exporter = PrometheusMetrics(app, path=None, registry=self.registry,
                                     export_defaults=False)
        exporter.info("llm_proxy_info", "The proxy's version", version=llm_proxy.settings.version)
        r = self.registry
        self.http_duration = Histogram(
            "llm_proxy_http_request_duration_seconds", "Client requests by method, URL rule and "
            "status, to the last byte", ["method", "url_rule", "status"],
            buckets=LATENCY_BUCKETS, registry=r)
        self.http_requests = Counter(
            "llm_proxy_http_request_total", "Client requests by method and status",
            ["method", "status"], registry=r)
        self.upstream_requests = Counter(
            "llm_proxy_upstream_requests_total", "Calls to providers by outcome "
            "(success, client_error, failure)", ["provider", "outcome"], registry=r)
        self.upstream_errors = Counter(
            "llm_proxy_upstream_errors_total", "Provider failures by kind (connect, timeout, "
            "connection, status, protocol, truncated, too_large, redirect, idle, duration)",
            ["provider", "kind"], registry=r)
        self.upstream_latency = Histogram(
            "llm_proxy_upstream_latency_seconds", "Time a provider took to answer (to the first "
            "event for streams), retries included", ["provider"], buckets=LATENCY_BUCKETS,
            registry=r)
        self.tokens = Counter(
            "llm_proxy_tokens_total", "Tokens by provider, model and type (prompt, completion), "
            "from the upstream's usage", ["provider", "model", "type"], registry=r)
        self.stream_duration = Histogram(
            "llm_proxy_stream_duration_seconds", "Whole duration of streamed answers",
            ["provider"], buckets=LATENCY_BUCKETS, registry=r)
        self.cache_results = Counter(
            "llm_proxy_cache_results_total", "Answers by what the response cache did "
            "(HIT, MISS, BYPASS, STALE)", ["result"], registry=r)
        self.rejected_requests = Counter(
            "llm_proxy_rejected_requests_total", "Requests the server refused or cut off before "
            "the app saw them (app/runtime/server.py), by reason", ["reason"], registry=r)
        for reason in REJECTION_REASONS:  # every series from 0, so rate() sees the first one
            self.rejected_requests.labels(reason)
        # Cost: key ids are configured, providers too, models bounded by _model_label.
        self.cost = Counter(
            "llm_proxy_cost_usd", "What answers cost at the price table (app/pricing.py), in "
            "USD, by API key id, model asked and provider; a request's summary call included",
            ["key_id", "model", "provider"], registry=r)
        self.unpriced = Counter(
            "llm_proxy_unpriced_answers", "Answers whose model (or summary model) has no price: "
            "counted as 0 USD; add it to pricing.models", ["model"], registry=r)
        # Budgets (app/store/spend.py): key ids are the database's keys that have a budget.
        self.budget_refusals = Counter(
            "llm_proxy_budget_refused_requests", "Requests refused (429 budget_exceeded) because "
            "their key spent its budget, by key id and period (daily, monthly, total)",
            ["key_id", "period"], registry=r)
        self.budget_soft = Counter(
            "llm_proxy_budget_soft_limit_crossings", "Times a key's spend passed its budget's "
            "soft limit, by key id and period", ["key_id", "period"], registry=r)
        self._cost_by_key: dict[str, float] = {}  # for the JSON view; configured key ids
        self._unpriced_count = 0
        r.register(_StateCollector(llm_proxy))
        r.register(_SupervisorCollector())
        self._models: set[str] = set()
        self._lock = threading.Lock()
        self._children: dict[tuple, object] = {}

    def upstream_call(self, provider, seconds, outcome):
        """One call to a provider ended: ``outcome`` is success, neutral or the UpstreamError."""
        if outcome == "success":
            self._child(self.upstream_requests, provider, "success").inc()
        elif outcome == "neutral":
            self._child(self.upstream_requests, provider, "client_error").inc()
        else:
            self._child(self.upstream_requests, provider, "failure").inc()
            self._child(self.upstream_errors, provider, outcome.kind).inc()
        if seconds is not None:
            self._child(self.upstream_latency, provider).observe(seconds)

    def http_request(self, method, url_rule, status, seconds):
        """Any request but /metrics: the series prometheus-flask-exporter would record."""
        status = str(status)
        self._child(self.http_duration, method, url_rule, status).observe(seconds)
        self._child(self.http_requests, method, status).inc()

    def request_done(self, trace, seconds, streamed):
        """An API request finished (for a stream: its last byte was sent); ``trace``: what
        serving it found (app.pipeline.Trace)."""
        if trace.cache:
            self._child(self.cache_results, trace.cache).inc()
        if streamed and trace.provider:
            self._child(self.stream_duration, trace.provider).observe(seconds)
        usage = trace.usage
        if usage and trace.provider and trace.cache not in ("HIT", "STALE"):
            label = self._model_label(trace.model)
            for kind in ("prompt", "completion"):
                count = usage.get(f"{kind}_tokens")
                if isinstance(count, int) and count > 0:
                    self._child(self.tokens, trace.provider, label, kind).inc(count)

    def rejected(self, reason):
        """A request refused at the server's header stage (``reason``: REJECTION_REASONS)."""
        self._child(self.rejected_requests, reason).inc()

    def answer_cost(self, key_id, trace, cost):
        """A proxied request ended; ``cost`` (app.pricing.Cost) is what its calls cost."""
        if cost.usd > 0:
            self._child(self.cost, key_id, self._model_label(trace.model),
                        trace.provider or "none").inc(cost.usd)
            with self._lock:
                self._cost_by_key[key_id] = self._cost_by_key.get(key_id, 0.0) + cost.usd
        if cost.unpriced:
            self._child(self.unpriced, self._model_label(cost.unpriced[0])).inc()
            with self._lock:
                self._unpriced_count += 1

    def budget_refused(self, key_id, period):
        self._child(self.budget_refusals, key_id, period).inc()

    def budget_soft_limit(self, key_id, period):
        self._child(self.budget_soft, key_id, period).inc()

    def cost_totals(self) -> dict:
        """The JSON view's ``costs``: USD by key id since start, and the unpriced answers."""
        with self._lock:
            by_key = {k: round(v, 8) for k, v in sorted(self._cost_by_key.items())}
            unpriced = self._unpriced_count
        return {"total_usd": round(sum(by_key.values()), 8), "by_key": by_key,
                "unpriced_answers": unpriced, "prices_as_of": PRICES_AS_OF}

    def _child(self, metric, *labels):
        """The labelled child, kept: prometheus_client's labels() validates and locks each call."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def prometheus_text(self) -> bytes:
        return generate_latest(self.registry)

    def open_models(self) -> dict[str, dict[str, dict]]:
        """The breakers' ``open_models()`` by model label (``_model_label``): the names a client
        made up under a pattern are the pattern's, with the worst state among them (open before
        half-open before cooling down, then the longest wait)."""
        found: dict[str, dict[str, dict]] = {}
        for provider, models in self.proxy.breakers.open_models().items():
            labelled = found.setdefault(provider, {})
            for model, snap in models.items():
                label = self._model_label(model)
                kept = labelled.get(label)
                if kept is None or ((BREAKER_STATES[snap["state"]], snap["retry_in"])
                                    > (BREAKER_STATES[kept["state"]], kept["retry_in"])):
                    labelled[label] = snap
        return found

    def _model_label(self, model: str) -> str:
        """``model`` when the proxy serves it by name (configured, an alias, or listed by its
        upstream), else the configured pattern that took it (``gpt-*``), else ``other``: never
        a name a client made up, whose labels would show it to every reader of /metrics and
        crowd out the real ones. At most ``MAX_MODELS`` names."""
        if model in self._models:
            return model
        router = self.proxy.router
        if not router.serves_by_name(model):
            return next((p for p in router.patterns() if fnmatch.fnmatchcase(model, p)), "other")
        with self._lock:
            if len(self._models) >= MAX_MODELS:
                return "other"
            self._models.add(model)
        return model


class _StateCollector:
    """Gauges read from the components at scrape time."""

    def __init__(self, llm_proxy):
        self.proxy = llm_proxy

    def collect(self):
        p = self.proxy
        for name, family in (("hits", "llm_proxy_cache_hits_total"),
                             ("misses", "llm_proxy_cache_misses_total"),
                             ("evictions", "llm_proxy_cache_evictions_total")):
            metric = CounterMetricFamily(family.removesuffix("_total"), f"Cache {name}",
                                         labels=["cache"])
            for cache, stats in p.caches.stats().items():
                metric.add_metric([cache], stats[name])
            yield metric
        for name, help_text in (("entries", "Entries held"), ("bytes", "Bytes held (accounted)")):
            metric = GaugeMetricFamily(f"llm_proxy_cache_{name}", help_text, labels=["cache"])
            for cache, stats in p.caches.stats().items():
                metric.add_metric([cache], stats[name])
            yield metric
        state = GaugeMetricFamily("llm_proxy_breaker_state",
                                  "Circuit breaker state: 0 closed, 1 half-open, 2 open",
                                  labels=["provider"])
        threshold = GaugeMetricFamily("llm_proxy_breaker_threshold",
                                      "Current failure threshold", labels=["provider"])
        success = GaugeMetricFamily("llm_proxy_breaker_success_rate",
                                    "Success rate over the breaker's window", labels=["provider"])
        in_flight = GaugeMetricFamily("llm_proxy_provider_in_flight",
                                      "Requests in flight per provider", labels=["provider"])
        for name, snap in p.breakers.snapshot().items():
            state.add_metric([name], BREAKER_STATES[snap["state"]])
            threshold.add_metric([name], snap["threshold"])
            success.add_metric([name], snap["success_rate"])
            in_flight.add_metric([name], p.bulkheads[name].in_flight)
        yield from (state, threshold, success, in_flight)
        # Only the models kept away now: at most circuit_breaker.max_model_breakers a provider
        models = GaugeMetricFamily("llm_proxy_model_breaker_state",
                                   "A model's breaker that is not closed or is cooling down: "
                                   "0 closed (cooling down), 1 half-open, 2 open",
                                   labels=["provider", "model"])
        for name, found in p.metrics.open_models().items():
            for model, snap in found.items():
                models.add_metric([name, model], BREAKER_STATES[snap["state"]])
        yield models
        yield GaugeMetricFamily("llm_proxy_requests_in_flight", "Requests being served",
                                value=p.admission.in_flight)
        memory = p.memory.stats()
        yield GaugeMetricFamily("llm_proxy_process_rss_bytes", "Resident memory of the process",
                                value=_rss_bytes(memory))
        collections = CounterMetricFamily("llm_proxy_gc_collections",
                                          "Garbage collections by generation",
                                          labels=["generation"])
        for generation, stats in enumerate(gc.get_stats()):
            collections.add_metric([str(generation)], stats["collections"])
        yield collections
        if p.shared is not None:
            redis = p.shared.stats()
            yield GaugeMetricFamily("llm_proxy_redis_available",
                                    "1 while shared state is in Redis, 0 while local",
                                    value=1 if redis["state"] == "closed" else 0)
            yield CounterMetricFamily("llm_proxy_redis_fallbacks",
                                      "Operations served locally because Redis was away",
                                      value=redis["fallbacks"])
        if p.store is not None:
            store = p.store.writer.stats()
            yield GaugeMetricFamily("llm_proxy_store_queued_rows", "Request log rows waiting "
                                    "for the database writer", value=store["queued"])
            yield CounterMetricFamily("llm_proxy_store_written_rows", "Request log rows written "
                                      "to the database", value=store["written"])
            yield CounterMetricFamily("llm_proxy_store_dropped_rows", "Request log rows dropped "
                                      "(queue full, or the database down at stop)",
                                      value=store["dropped"])
            yield GaugeMetricFamily("llm_proxy_store_available", "1 while the database answers "
                                    "the writer, 0 while it fails",
                                    value=0 if store["failing_for"] is not None else 1)
        yield GaugeMetricFamily("llm_proxy_memory_pressure",
                                "Memory pressure: 0 normal, 1 high, 2 critical",
                                value=PRESSURE_LEVELS.get(memory.get("pressure"), 0))


class _SupervisorCollector:
    """Under ``WORKERS=N``: the supervisor's restart counts, read from the file it publishes
    (app/runtime/supervision.py). Every worker reports the same figures (aggregate with ``max``, not
    ``sum``); a process that is not supervised reports none."""

    def collect(self):
        state = read_state()
        if state is None:
            return
        restarts = CounterMetricFamily("llm_proxy_worker_restarts",
                                       "Times the supervisor restarted a worker slot",
                                       labels=["worker"])
        delay = GaugeMetricFamily("llm_proxy_worker_restart_delay_seconds",
                                  "The slot's last restart delay (backoff); 0 once healthy",
                                  labels=["worker"])
        workers = GaugeMetricFamily("llm_proxy_workers", "Worker slots by state: running, or "
                                    "waiting out a restart delay", labels=["state"])
        counts = {"running": 0, "waiting": 0}
        for slot in state["workers"]:
            restarts.add_metric([str(slot["worker"])], slot["restarts"])
            delay.add_metric([str(slot["worker"])], slot["delay"])
            counts[slot["state"]] = counts.get(slot["state"], 0) + 1
        for name, count in counts.items():
            workers.add_metric([name], count)
        yield from (restarts, delay, workers)


def _rss_bytes(memory) -> float:
    if memory and memory.get("rss_mb") is not None:
        return memory["rss_mb"] * 1024 * 1024
    return psutil.Process(os.getpid()).memory_info().rss


def json_view(llm_proxy) -> dict:
    """The figures in the JSON shape (``/metrics?format=json``)."""
    p = llm_proxy
    with_http = [a for a in p.providers if a.http is not None]
    caches = p.caches.stats()
    memory = p.memory.stats()
    return {
        "system": {"version": p.settings.version, "uptime": round(time.time() - p.started_at, 1),
                   "pid": os.getpid(), "threads": threading.active_count(),
                   "rss_mb": round(_rss_bytes(memory) / 1024 / 1024, 1),
                   "requests_in_flight": p.admission.in_flight},
        "performance": {
            "http_client": {**combined_stats(a.http for a in with_http),
                            "providers": {a.name: a.http.stats.snapshot() for a in with_http}},
            "memory": memory,
        },
        "caches": caches,
        "circuit_breakers": p.breakers.snapshot(),
        **({"model_breakers": models} if (models := p.metrics.open_models()) else {}),
        **({"costs": p.metrics.cost_totals()} if p.metrics.enabled else {}),
        **({"redis": p.shared.stats()} if p.shared is not None else {}),
        **({"supervisor": supervisor} if (supervisor := read_state()) is not None else {}),
    }
