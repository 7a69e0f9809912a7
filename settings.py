"""Every setting of the proxy: typed defaults, the production profile, the YAML file, env vars.

Precedence, lowest first: the defaults below (the seed's numbers), the production profile when
``ENVIRONMENT=production``, the YAML config file (``PROXY_CONFIG``, default ``./config.yaml``),
then the environment variables in ``ENV_VARS``. A bad value raises ``SettingsError`` with one
line naming the field and what is wrong.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field

import yaml

VERSION = "1.0.0"
PROVIDER_TYPES = ("openai", "azure_openai", "anthropic", "mock")


class SettingsError(ValueError):
    """A setting is missing, unknown or of the wrong type or range."""


@dataclass
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    threads: int = 64  # each request holds one for its life: LLM calls last seconds
    connection_limit: int = 1000
    channel_timeout: int = 120
    max_request_body_mb: float = 10.0
    workers: int = 1  # waitress processes sharing the port (SO_REUSEPORT), supervised
    header_timeout: float = 30.0  # seconds a connection may take to send a request's headers
    max_header_kb: int = 64  # request line and headers; larger: 431

    def validate(self, path):
        _check(self.workers >= 1, f"{path}.workers", "must be at least 1")
        _check(1 <= self.port <= 65535, f"{path}.port", "must be between 1 and 65535")
        _check(self.threads >= 1, f"{path}.threads", "must be at least 1")
        _check(self.connection_limit >= 1, f"{path}.connection_limit", "must be at least 1")
        _check(self.max_request_body_mb > 0, f"{path}.max_request_body_mb", "must be positive")
        _check(self.header_timeout > 0, f"{path}.header_timeout", "must be positive")
        _check(self.max_header_kb >= 1, f"{path}.max_header_kb", "must be at least 1")


@dataclass
class HttpClientSettings:
    max_keepalive_connections: int = 200
    max_connections: int = 2000
    keepalive_expiry: float = 30.0
    timeout: float = 30.0
    connect_timeout: float = 10.0
    retry_attempts: int = 3
    backoff_base: float = 0.25
    backoff_max: float = 8.0
    retry_after_max: float = 10.0
    deadline: float = 120.0  # a whole (non-stream) answer, every attempt and its body included
    max_response_mb: float = 32.0  # an upstream body past this (after decompression): 502

    def validate(self, path):
        for name in ("keepalive_expiry", "timeout", "connect_timeout", "deadline",
                     "max_response_mb"):
            _check(getattr(self, name) > 0, f"{path}.{name}", "must be positive")
        _check(self.retry_attempts >= 0, f"{path}.retry_attempts", "must be 0 or more")
        _check(self.max_keepalive_connections >= 1, f"{path}.max_keepalive_connections",
               "must be at least 1")


@dataclass
class StreamingSettings:
    """Bounds on a streamed answer once it has begun (before that, http_client's apply)."""
    max_event_kb: float = 4096.0  # one SSE event from an upstream; past it the stream ends
    idle_timeout: float = 300.0  # seconds between two upstream events (bytes may still drip)
    max_duration: float = 3600.0  # seconds from the request's start to the stream's end
    keepalive_interval: float = 15.0  # an SSE comment to the client after this much quiet; 0: off

    def validate(self, path):
        for name in ("max_event_kb", "idle_timeout", "max_duration"):
            _check(getattr(self, name) > 0, f"{path}.{name}", "must be positive")
        _check(self.keepalive_interval >= 0, f"{path}.keepalive_interval",
               "must be 0 (off) or positive")


@dataclass
class CircuitBreakerSettings:
    failure_threshold: int = 5
    recovery_timeout: float = 60.0
    success_threshold: int = 3
    adaptive_thresholds: bool = True
    window: int = 100  # calls remembered for the success rate
    min_threshold: int = 2  # the tightest threshold for a provider that has been healthy
    failure_rate: float = 0.5  # trip at this share of failures in the window...
    min_calls: int = 10  # ...once the window holds this many calls

    def validate(self, path):
        for name in ("failure_threshold", "success_threshold", "window", "min_threshold",
                     "min_calls"):
            _check(getattr(self, name) >= 1, f"{path}.{name}", "must be at least 1")
        _check(self.recovery_timeout > 0, f"{path}.recovery_timeout", "must be positive")
        _check(0 < self.failure_rate <= 1, f"{path}.failure_rate", "must be in (0, 1]")


@dataclass
class CacheSettings:
    enabled: bool = True
    response_cache_size: int = 10000
    response_cache_ttl: float = 1800.0
    summary_cache_size: int = 2000
    summary_cache_ttl: float = 3600.0
    max_memory_mb: float = 512.0  # both caches together
    stale_ttl: float = 600.0  # serve an answer this long past its TTL when every provider fails
    coalesce: bool = True  # identical requests in flight share one upstream call
    disabled_models: list[str] = field(default_factory=list)  # names or glob patterns

    def validate(self, path):
        for name in ("response_cache_size", "summary_cache_size"):
            _check(getattr(self, name) >= 1, f"{path}.{name}", "must be at least 1")
        for name in ("response_cache_ttl", "summary_cache_ttl", "max_memory_mb"):
            _check(getattr(self, name) > 0, f"{path}.{name}", "must be positive")
        _check(self.stale_ttl >= 0, f"{path}.stale_ttl", "must be 0 or more")


@dataclass
class CondenseSettings:
    enabled: bool = True
    threshold_tokens: int = 12000  # estimated tokens (about 4 characters each) that trigger it
    keep_last: int = 6  # messages kept as they are, besides the system prompt
    step: int = 6  # the summarized part grows this many messages at a time, so turns reuse it
    summary_model: str = ""  # the model that summarizes; empty: the request's own model
    summary_max_tokens: int = 512
    fallback: str = "truncate"  # when summarizing fails: truncate the oldest turns, or none

    def validate(self, path):
        _check(self.threshold_tokens >= 1, f"{path}.threshold_tokens", "must be at least 1")
        _check(self.keep_last >= 1, f"{path}.keep_last", "must be at least 1")
        _check(self.step >= 1, f"{path}.step", "must be at least 1")
        _check(self.fallback in ("truncate", "none"), f"{path}.fallback",
               f"must be truncate or none, got {self.fallback!r}")


@dataclass
class MemorySettings:
    memory_threshold_mb: float = 1024.0  # past it: clean up (expire caches, collect)
    emergency_threshold_mb: float = 1536.0  # past it: shrink caches, clear summaries, full GC
    cleanup_interval: float = 300.0  # seconds between periodic cleanups and leak snapshots
    sample_interval: float = 10.0  # seconds between RSS samples
    enable_gc_tuning: bool = False  # gc.freeze() + the thresholds below: measured, no gain
    gc_thresholds: list[int] = field(default_factory=lambda: [50000, 20, 20])
    leak_detection_enabled: bool = True
    leak_snapshots: int = 5  # steady growth over this many snapshots is a suspected leak

    def validate(self, path):
        _check(self.memory_threshold_mb > 0, f"{path}.memory_threshold_mb", "must be positive")
        _check(self.emergency_threshold_mb > self.memory_threshold_mb,
               f"{path}.emergency_threshold_mb", "must be above memory_threshold_mb")
        _check(self.cleanup_interval > 0 and self.sample_interval > 0, f"{path}.sample_interval",
               "intervals must be positive")
        _check(len(self.gc_thresholds) == 3 and all(t >= 0 for t in self.gc_thresholds),
               f"{path}.gc_thresholds", "must be three numbers, 0 or more")
        _check(self.leak_snapshots >= 2, f"{path}.leak_snapshots", "must be at least 2")


@dataclass
class ObservabilitySettings:
    metrics_enabled: bool = True  # /metrics and the per-request counters
    access_log: bool = True  # one line per request on stdout
    access_log_format: str = "json"  # json or text

    def validate(self, path):
        _check(self.access_log_format in ("json", "text"), f"{path}.access_log_format",
               f"must be json or text, got {self.access_log_format!r}")


@dataclass
class AuthSettings:
    api_keys_required: bool = False  # API_KEYS_REQUIRED; without it, no key = anonymous tenant
    api_keys: list[dict[str, object]] = field(default_factory=list)  # {id, sha256, limits...}
    env_keys: str = field(default="", repr=False)  # PROXY_API_KEYS="id:key,...", hashed at load
    models: list[str] = field(default_factory=list)  # default allow-list (empty: every model)
    requests_per_minute: int = 0  # RATE_LIMIT_REQUESTS per key and for anonymous; 0: no limit
    tokens_per_minute: int = 0
    max_in_flight: int = 0
    window: float = 60.0  # seconds the per-minute limits refer to
    metrics_require_key: bool = False  # /metrics needs the admin key or a client key

    def validate(self, path):
        _check(self.window > 0, f"{path}.window", "must be positive")
        for name in ("requests_per_minute", "tokens_per_minute", "max_in_flight"):
            _check(getattr(self, name) >= 0, f"{path}.{name}", "must be 0 (no limit) or more")
        try:
            self.key_store()
        except ValueError as e:
            raise SettingsError(f"{path}: {e}") from None

    def key_store(self):
        """The client keys, hashed; ValueError naming a bad entry."""
        from app.auth import KeyStore

        defaults = {"models": self.models, "requests_per_minute": self.requests_per_minute,
                    "tokens_per_minute": self.tokens_per_minute,
                    "max_in_flight": self.max_in_flight}
        return KeyStore.from_config(self.api_keys, self.env_keys,
                                    required=self.api_keys_required, defaults=defaults)


@dataclass
class RedisSettings:
    url: str = ""  # REDIS_URL; empty: every store is in-process
    prefix: str = "llmproxy:"  # keys of this deployment
    timeout: float = 0.1  # seconds for a Redis call; slower counts as a failure
    failure_threshold: int = 3  # Redis failures in a row before the proxy stops asking it
    recovery_timeout: float = 5.0  # seconds before it tries Redis again
    local_fallback_mb: float = 64.0  # the in-process caches used while Redis is away

    def validate(self, path):
        if self.url:
            _check(self.url.startswith(("redis://", "rediss://", "unix://")), f"{path}.url",
                   "must be a redis://, rediss:// or unix:// URL")
        _check(self.timeout > 0 and self.recovery_timeout > 0, f"{path}.timeout",
               "timeouts must be positive")
        _check(self.failure_threshold >= 1, f"{path}.failure_threshold", "must be at least 1")


@dataclass
class RoutingSettings:
    strategy: str = "weighted"  # among equal priority: weighted (random by weight) or least_in_flight
    max_in_flight: int = 0  # requests in the proxy at once; 0: threads less a few kept free
    provider_max_in_flight: int = 0  # per provider unless it sets its own; 0: 3/4 of max_in_flight

    def validate(self, path):
        _check(self.strategy in ("weighted", "least_in_flight"), f"{path}.strategy",
               f"must be weighted or least_in_flight, got {self.strategy!r}")
        _check(self.max_in_flight >= 0, f"{path}.max_in_flight", "must be 0 (derived) or more")
        _check(self.provider_max_in_flight >= 0, f"{path}.provider_max_in_flight",
               "must be 0 (derived) or more")


@dataclass
class ProviderSettings:
    name: str
    type: str
    base_url: str = ""
    api_key_env: str = ""
    models: list[str] = field(default_factory=list)
    aliases: dict[str, str] = field(default_factory=dict)
    enabled: bool = True
    priority: int = 100
    weight: float = 1.0  # share of traffic among providers of equal priority
    max_in_flight: int = 0  # bulkhead; 0: routing.provider_max_in_flight
    timeout: float = 0.0  # 0: the http_client timeout
    headers: dict[str, str] = field(default_factory=dict)
    api_version: str = "2024-10-21"  # azure_openai only
    max_tokens_default: int = 4096  # anthropic only: its API requires max_tokens
    latency_ms: float = 0.0  # mock only: delay before the answer
    chunk_delay_ms: float = 0.0  # mock only: delay between streamed chunks
    chunks: int = 5  # mock only: chunks per streamed answer
    embedding_dimensions: int = 16  # mock only

    def validate(self, path):
        _check(bool(self.name), f"{path}.name", "must not be empty")
        _check(self.type in PROVIDER_TYPES, f"{path}.type",
               f"must be one of {', '.join(PROVIDER_TYPES)}, got {self.type!r}")
        if self.type != "mock":
            _check(self.base_url.startswith(("http://", "https://")), f"{path}.base_url",
                   "must be an http:// or https:// URL")
        _check(bool(self.models or self.aliases), f"{path}.models", "must name at least one model")
        _check(self.timeout >= 0, f"{path}.timeout", "must be 0 (default) or positive")
        _check(self.weight > 0, f"{path}.weight", "must be positive")
        _check(self.max_in_flight >= 0, f"{path}.max_in_flight", "must be 0 (derived) or more")
        _check(self.chunks >= 1, f"{path}.chunks", "must be at least 1")

    @property
    def api_key(self) -> str:
        """The provider key, read from the environment variable named in the config."""
        return os.environ.get(self.api_key_env, "") if self.api_key_env else ""


@dataclass
class Settings:
    environment: str = "development"
    version: str = VERSION
    log_level: str = "INFO"
    config_path: str = ""
    admin_api_key: str = ""  # ADMIN_API_KEY; unset: /debug/* is disabled
    server: ServerSettings = field(default_factory=ServerSettings)
    http_client: HttpClientSettings = field(default_factory=HttpClientSettings)
    streaming: StreamingSettings = field(default_factory=StreamingSettings)
    circuit_breaker: CircuitBreakerSettings = field(default_factory=CircuitBreakerSettings)
    routing: RoutingSettings = field(default_factory=RoutingSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    condense: CondenseSettings = field(default_factory=CondenseSettings)
    memory_manager: MemorySettings = field(default_factory=MemorySettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    redis: RedisSettings = field(default_factory=RedisSettings)
    observability: ObservabilitySettings = field(default_factory=ObservabilitySettings)
    providers: list[ProviderSettings] = field(default_factory=list)

    @property
    def max_in_flight(self) -> int:
        """Requests served at once; the threads above it stay free to refuse quickly."""
        return self.routing.max_in_flight or max(1, self.server.threads - max(2, self.server.threads // 8))

    def provider_max_in_flight(self, provider: ProviderSettings) -> int:
        """One provider's bulkhead: a hanging provider cannot take every thread."""
        return (provider.max_in_flight or self.routing.provider_max_in_flight
                or max(1, self.max_in_flight * 3 // 4))

    def validate(self, path="settings"):
        _check(self.environment in ("development", "production"), "environment",
               f"must be development or production, got {self.environment!r}")
        self.server.validate("server")
        self.http_client.validate("http_client")
        self.streaming.validate("streaming")
        self.circuit_breaker.validate("circuit_breaker")
        self.routing.validate("routing")
        self.cache.validate("cache")
        self.condense.validate("condense")
        self.memory_manager.validate("memory_manager")
        self.auth.validate("auth")
        self.redis.validate("redis")
        self.observability.validate("observability")
        names = set()
        for i, provider in enumerate(self.providers):
            provider.validate(f"providers[{i}]")
            _check(provider.name not in names, f"providers[{i}].name",
                   f"duplicate provider name {provider.name!r}")
            names.add(provider.name)
        _check(any(p.enabled for p in self.providers), "providers", "no provider is enabled")


PRODUCTION_PROFILE = {
    "log_level": "WARNING",
    "server": {"host": "0.0.0.0", "threads": 256, "connection_limit": 2000},
    "http_client": {"max_connections": 5000},
    "cache": {"max_memory_mb": 1024},
    "auth": {"api_keys_required": True, "requests_per_minute": 10000},
}

# Environment variable -> (section or None, field). The seed's names are kept.
ENV_VARS = {
    "ENVIRONMENT": (None, "environment"),
    "LOG_LEVEL": (None, "log_level"),
    "HOST": ("server", "host"),
    "PORT": ("server", "port"),
    "THREADS": ("server", "threads"),
    "CONNECTION_LIMIT": ("server", "connection_limit"),
    "CHANNEL_TIMEOUT": ("server", "channel_timeout"),
    "MAX_REQUEST_BODY_MB": ("server", "max_request_body_mb"),
    "HEADER_TIMEOUT": ("server", "header_timeout"),
    "MAX_HEADER_KB": ("server", "max_header_kb"),
    "HTTP_MAX_CONNECTIONS": ("http_client", "max_connections"),
    "HTTP_MAX_KEEPALIVE_CONNECTIONS": ("http_client", "max_keepalive_connections"),
    "HTTP_KEEPALIVE_EXPIRY": ("http_client", "keepalive_expiry"),
    "HTTP_TIMEOUT": ("http_client", "timeout"),
    "HTTP_CONNECT_TIMEOUT": ("http_client", "connect_timeout"),
    "HTTP_RETRY_ATTEMPTS": ("http_client", "retry_attempts"),
    "HTTP_DEADLINE": ("http_client", "deadline"),
    "HTTP_MAX_RESPONSE_MB": ("http_client", "max_response_mb"),
    "STREAM_MAX_EVENT_KB": ("streaming", "max_event_kb"),
    "STREAM_IDLE_TIMEOUT": ("streaming", "idle_timeout"),
    "STREAM_MAX_DURATION": ("streaming", "max_duration"),
    "STREAM_KEEPALIVE_INTERVAL": ("streaming", "keepalive_interval"),
    "ADMIN_API_KEY": (None, "admin_api_key"),
    "CIRCUIT_BREAKER_FAILURE_THRESHOLD": ("circuit_breaker", "failure_threshold"),
    "CIRCUIT_BREAKER_RECOVERY_TIMEOUT": ("circuit_breaker", "recovery_timeout"),
    "CIRCUIT_BREAKER_SUCCESS_THRESHOLD": ("circuit_breaker", "success_threshold"),
    "CIRCUIT_BREAKER_ADAPTIVE": ("circuit_breaker", "adaptive_thresholds"),
    "ROUTING_STRATEGY": ("routing", "strategy"),
    "MAX_IN_FLIGHT": ("routing", "max_in_flight"),
    "PROVIDER_MAX_IN_FLIGHT": ("routing", "provider_max_in_flight"),
    "CACHE_ENABLED": ("cache", "enabled"),
    "CACHE_MAX_MEMORY_MB": ("cache", "max_memory_mb"),
    "CACHE_RESPONSE_TTL": ("cache", "response_cache_ttl"),
    "CACHE_STALE_TTL": ("cache", "stale_ttl"),
    "CONDENSE_ENABLED": ("condense", "enabled"),
    "CONDENSE_THRESHOLD_TOKENS": ("condense", "threshold_tokens"),
    "CONDENSE_SUMMARY_MODEL": ("condense", "summary_model"),
    "MEMORY_THRESHOLD_MB": ("memory_manager", "memory_threshold_mb"),
    "MEMORY_EMERGENCY_THRESHOLD_MB": ("memory_manager", "emergency_threshold_mb"),
    "MEMORY_CLEANUP_INTERVAL": ("memory_manager", "cleanup_interval"),
    "GC_TUNING_ENABLED": ("memory_manager", "enable_gc_tuning"),
    "METRICS_ENABLED": ("observability", "metrics_enabled"),
    "ACCESS_LOG_ENABLED": ("observability", "access_log"),
    "ACCESS_LOG_FORMAT": ("observability", "access_log_format"),
    "API_KEYS_REQUIRED": ("auth", "api_keys_required"),
    "PROXY_API_KEYS": ("auth", "env_keys"),
    "RATE_LIMIT_REQUESTS": ("auth", "requests_per_minute"),
    "RATE_LIMIT_TOKENS": ("auth", "tokens_per_minute"),
    "METRICS_REQUIRE_KEY": ("auth", "metrics_require_key"),
    "WORKERS": ("server", "workers"),
    "REDIS_URL": ("redis", "url"),
}

MOCK_PROVIDER = {
    "name": "mock", "type": "mock", "priority": 1,
    "models": ["mock-model", "gpt-4o-mini", "text-embedding-3-small"],
}
OPENAI_PROVIDER = {
    "name": "openai", "type": "openai", "base_url": "https://api.openai.com/v1",
    "api_key_env": "OPENAI_API_KEY", "priority": 1,
    "models": ["gpt-*", "chatgpt-*", "o1*", "o3*", "o4*", "text-embedding-*"],
}
ANTHROPIC_PROVIDER = {
    "name": "anthropic", "type": "anthropic", "base_url": "https://api.anthropic.com",
    "api_key_env": "ANTHROPIC_API_KEY", "priority": 1, "models": ["claude-*"],
}


def load_settings(environ=None, config_path=None) -> Settings:
    """Build and validate the settings from the environment and the YAML file."""
    environ = os.environ if environ is None else environ
    data: dict = {}
    if environ.get("ENVIRONMENT", "development") == "production":
        _merge(data, PRODUCTION_PROFILE)
    path = config_path or environ.get("PROXY_CONFIG") or "config.yaml"
    if os.path.exists(path):
        _merge(data, _read_yaml(path))
        data["config_path"] = path
    elif config_path or environ.get("PROXY_CONFIG"):
        raise SettingsError(f"config file {path}: not found")
    for var, (section, name) in ENV_VARS.items():
        if var in environ:
            target = data.setdefault(section, {}) if section else data
            target[name] = environ[var]
    if "providers" not in data:
        data["providers"] = default_providers(environ)
    return build_settings(data)


def build_settings(data: dict) -> Settings:
    """Settings from a plain dict (the YAML shape); used by tests too."""
    settings = _convert(Settings, data, "")
    settings.validate()
    return settings


def default_providers(environ) -> list[dict]:
    """With no config file: the real providers whose keys are set, else the mock."""
    found = [dict(p) for p in (OPENAI_PROVIDER, ANTHROPIC_PROVIDER) if environ.get(p["api_key_env"])]
    return found or [dict(MOCK_PROVIDER)]


def _read_yaml(path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise SettingsError(f"config file {path}{where}: invalid YAML") from None
    if not isinstance(data, dict):
        raise SettingsError(f"config file {path}: must be a mapping of settings")
    return data


def _merge(into: dict, other: dict):
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _check(ok, path, message):
    if not ok:
        raise SettingsError(f"{path}: {message}")


def _convert(tp, value, path):
    """Coerce a YAML/env value to the annotated type, naming the field on failure."""
    label = path or "settings"
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise SettingsError(f"{label}: expected a mapping, got {type(value).__name__}")
        hints = typing.get_type_hints(tp)
        known = {f.name for f in dataclasses.fields(tp)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise SettingsError(f"{_join(path, unknown[0])}: unknown setting")
        missing = [f.name for f in dataclasses.fields(tp)
                   if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                   and f.name not in value]
        if missing:
            raise SettingsError(f"{_join(path, missing[0])}: required")
        return tp(**{k: _convert(hints[k], v, _join(path, k)) for k, v in value.items()})
    origin = typing.get_origin(tp)
    if origin is list:
        if not isinstance(value, list):
            raise SettingsError(f"{label}: expected a list, got {type(value).__name__}")
        (item,) = typing.get_args(tp)
        return [_convert(item, v, f"{label}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise SettingsError(f"{label}: expected a mapping, got {type(value).__name__}")
        _, item = typing.get_args(tp)
        return {str(k): _convert(item, v, f"{label}.{k}") for k, v in value.items()}
    return _scalar(tp, value, label)


def _scalar(tp, value, label):
    if tp is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise SettingsError(f"{label}: expected true or false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise SettingsError(f"{label}: expected a number, got {value!r}")
        kind = "an integer" if tp is int else "a number"
        if tp is int and isinstance(value, float):
            raise SettingsError(f"{label}: expected {kind}, got {value!r}")
        try:
            return tp(value)
        except (TypeError, ValueError):
            raise SettingsError(f"{label}: expected {kind}, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise SettingsError(f"{label}: expected text, got {type(value).__name__}")
        return str(value)
    return value


def _join(path, name):
    return f"{path}.{name}" if path else name
