"""The LLM proxy: ``create_app`` builds every component from the settings and wires them."""

from __future__ import annotations

import logging
import sys
import time

from flask import Flask

from app import api, console
from app.auth import KeyStore
from app.cache import Coalescer, caches_for
from app.cache.condense import Condensation
from app.cache.responses import ResponseCache
from app.observability.access_log import AccessLog
from app.observability.metrics import NullMetrics, ProxyMetrics
from app.observability.timeline import timeline_for
from app.observability.tracing import tracing_for
from app.pipeline import Pipeline
from app.pipeline.breakers import BreakerBoard
from app.pipeline.bulkhead import Bulkhead
from app.pipeline.gateway import Gateway
from app.pipeline.limits import RateLimiter, WorkerShare
from app.pipeline.router import Router
from app.pricing import PriceTable
from app.providers import build_provider
from app.providers.discovery import ModelDiscovery
from app.runtime.memory import MemoryManager
from app.store import Store
from app.store.spend import SpendLedger
from app.upstream.secrets import Secrets
from settings import Settings, SettingsError, load_settings

log = logging.getLogger("llm_proxy")


class LLMProxy:
    """The components one app owns, reachable as ``app.extensions["llm_proxy"]``."""

    def __init__(self, settings: Settings, *, clock=time.monotonic, wall=time.time):
        self.settings = settings
        self.clock = clock  # intervals and timeouts
        self.wall = wall  # dates: budgets' days and months, key expiry, the request log
        self.started_at = time.time()
        self.metrics = NullMetrics()
        o = settings.observability
        self.access_log = AccessLog(enabled=o.access_log, fmt=o.access_log_format)
        # The console's last hour, second by second (a stand-in recording nothing while the
        # console is off); shared through Redis when it is set
        self.timeline = timeline_for(settings, wall=wall)
        # OpenTelemetry traces: a stand-in doing nothing unless a traces endpoint is set
        self.tracing = tracing_for(settings)
        # Every key the proxy knows, scrubbed from whatever any upstream sends back.
        self.secrets = Secrets.from_settings(settings)
        self.providers = [build_provider(p, settings, secrets=self.secrets, clock=clock)
                          for p in settings.providers]
        for adapter in self.providers:
            if adapter.settings.enabled and adapter.missing_key:
                log.warning("provider %s: its key variable %s is unset: its calls go without a "
                            "key, which most upstreams refuse (HTTP 401)", adapter.name,
                            adapter.missing_key)
        self.shared = _shared_state(settings, clock) if settings.redis.url else None
        self.breakers = BreakerBoard(
            [p.name for p in settings.providers], settings.circuit_breaker, clock=clock,
            storage_factory=self.shared.breaker_storage if self.shared else None)
        self.bulkheads = {p.name: Bulkhead(settings.provider_max_in_flight(p))
                          for p in settings.providers}
        self.admission = Bulkhead(settings.max_in_flight)
        self.router = Router(self.providers, strategy=settings.routing.strategy,
                             load=lambda name: self.bulkheads[name].in_flight)
        self.prices = PriceTable.from_settings(settings.pricing, router=self.router)
        self.gateway = Gateway(self.router, self.breakers, self.bulkheads, self.admission,
                               clock=clock, tracing=self.tracing,
                               keepalive_interval=settings.streaming.keepalive_interval)
        c = settings.cache
        # In-process caches; with Redis they are the small fallback behind the shared ones.
        local_caches = caches_for(c, clock=clock, max_memory_mb=settings.redis.local_fallback_mb
                                  if self.shared else None)
        self.caches = (self.shared.caches(local_caches, c, clock=clock) if self.shared
                       else local_caches)
        self.condensation = Condensation.from_settings(
            settings.condense, self.caches.summary, self.gateway, coalescer=Coalescer(clock=clock))
        # this process's memory: never the shared caches
        self.memory = MemoryManager(local_caches, settings.memory_manager, clock=clock)
        # Keys made through the admin API, spend and the request log: beside the path
        self.store = (Store(settings, secrets=self.secrets, router=self.router, clock=clock,
                            wall=wall) if settings.database.enabled else None)
        self.keys = KeyStore.from_keys(settings.auth.client_keys(),
                                       self.store.directory if self.store else None)
        self.limiter = self._limiter(settings, clock)
        self.responses = ResponseCache(self.caches.response, Coalescer(clock=clock), c,
                                       router=self.router, timeout=settings.http_client.deadline)
        self.pipeline = Pipeline(self.limiter, self.responses, self.condensation, self.gateway,
                                 prices=self.prices, clock=clock, tracing=self.tracing,
                                 budgets=self.store.ledger if self.store else SpendLedger())
        # The models behind the providers' patterns, asked of their upstreams in the background.
        interval = settings.routing.model_refresh_interval  # 0: never asked
        self.discovery = ModelDiscovery(self.providers, self.router, interval=interval)
        if interval:
            self.discovery.start()

    def _limiter(self, settings: Settings, clock) -> RateLimiter:
        """The rate limiter: buckets in Redis, exact across processes, or in this process,
        which then enforces its worker's share of every limit (``WorkerShare``)."""
        auth = settings.auth
        options = dict(window=auth.window, reserve_completion=auth.reserve_completion_tokens,
                       in_flight_share=auth.in_flight_share(settings.max_in_flight))
        if self.shared:  # buckets shared across machines need wall-clock time
            return RateLimiter(self.shared.limit_store(), clock=time.time, **options)
        share = WorkerShare(settings.server.worker_index, settings.server.workers)
        return RateLimiter(clock=clock, share=share, **options)

    def attach_metrics(self, metrics):
        """Metrics need the Flask app; they are attached once it exists."""
        self.metrics = self.gateway.metrics = metrics
        if self.store is not None:
            self.store.ledger.metrics = metrics

    def close(self):
        self.discovery.close()
        self.timeline.close()
        self.memory.stop()
        if self.store is not None:
            self.store.close()
        if self.shared:
            self.shared.close()
        for adapter in self.providers:
            adapter.close()
        self.tracing.close()  # the last spans sent, within a bound


def create_app(settings: Settings | None = None, *, clock=time.monotonic,
               wall=time.time) -> Flask:
    """The Flask app; settings come from the environment and config file when not given."""
    serving = settings is None  # built from the environment: a real server is starting
    if serving:
        settings = _load_or_exit()

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = int(settings.server.max_request_body_mb * 1024 * 1024)
    app.json.sort_keys = False
    llm_proxy = app.extensions["llm_proxy"] = LLMProxy(settings, clock=clock, wall=wall)
    api.register(app)
    if settings.console_on:  # else nothing under /console is routed: a 404
        console.register(app)
    if settings.observability.metrics_enabled:
        llm_proxy.attach_metrics(ProxyMetrics(app, llm_proxy))
    llm_proxy.memory.start()
    if serving and settings.memory_manager.enable_gc_tuning:
        llm_proxy.memory.tune_gc()  # after start-up: freeze what start-up made (process-wide)
    return app


def configure_logging(settings: Settings):
    logging.basicConfig(level=settings.log_level.upper(), stream=sys.stdout,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def describe(settings: Settings) -> str:
    """The first log line: what serves, and why when it is the mock. Not where: the app does
    not bind the socket. ``python wsgi.py`` logs ``listening on HOST:PORT`` once it has bound
    it; under ``waitress-serve`` (or any WSGI server) that server's own flags decide, and it
    says so itself."""
    enabled = [p for p in settings.providers if p.enabled]
    names = ", ".join(f"{p.name} ({p.type})" for p in enabled)
    source = settings.config_path or "no config file"
    line = (f"llm-proxy {settings.version} ({settings.environment}), providers: {names}; "
            f"{source}")
    if not settings.config_path and all(p.type == "mock" for p in enabled):
        line += "; no provider keys set: serving the built-in mock provider"
    return line


def _load_or_exit() -> Settings:
    try:
        settings = load_settings()
    except SettingsError as e:
        print(f"llm-proxy: bad configuration: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(settings)
    log.warning(describe(settings))
    return settings


def _shared_state(settings: Settings, clock):
    """The state shared through Redis (``REDIS_URL``): redis-py is imported only then (8.6 MB
    of RSS that a proxy without Redis does not carry)."""
    from app.state import SharedState
    return SharedState(settings, clock=clock)
