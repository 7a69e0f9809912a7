"""Every setting of the proxy: typed defaults, the production profile, the YAML file, env vars.

Precedence, lowest first: the defaults below, the production profile, the YAML config file
(``PROXY_CONFIG``, default ``./config.yaml``), then the environment variables in ``ENV_VARS``.
The profile applies when ``ENVIRONMENT`` is ``production``, or, with that variable unset, when
the file says ``environment: production``. Loading is a pure function of those inputs and the
environment mapping it is given: provider keys are read from that mapping at load time too. A
bad value raises ``SettingsError`` with one line naming the field, and the variable when one
set it.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import os
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import yaml

VERSION = "1.0.0"
PROVIDER_TYPES = ("openai", "azure_openai", "anthropic", "mock")


# Field metadata: why the YAML file may not set this field (a secret, or what the loader fills in).
NOT_IN_FILE = "not_in_file"


class SettingsError(ValueError):
    """A setting is missing, unknown or of the wrong type or range; ``path`` names the field."""

    def __init__(self, reason: str, path: str = ""):
        super().__init__(f"{path}: {reason}" if path else reason)
        self.path, self.reason = path, reason


@dataclass
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    threads: int = 64  # each request holds one for its life: LLM calls last seconds
    connection_limit: int = 1000
    channel_timeout: int = 120
    max_request_body_mb: float = 10.0
    workers: int = 1  # waitress processes sharing the port (SO_REUSEPORT), supervised
    # With workers > 1, each worker on a core of its own (app/runtime/workers.py: pin_worker)
    pin_workers: bool = True
    worker_index: int = field(default=0, metadata={  # which of the workers this process is
        NOT_IN_FILE: "the supervisor gives each worker its WORKER_INDEX"})
    header_timeout: float = 30.0  # seconds a connection may take to send a request's headers
    max_header_kb: int = 64  # request line and headers; larger: 431
    shutdown_grace: float = 25.0  # seconds in-flight requests get to finish on SIGTERM/SIGINT

    def validate(self, path):
        _check(self.workers >= 1, f"{path}.workers", "must be at least 1")
        _check(0 <= self.worker_index < self.workers, f"{path}.worker_index",
               f"must be 0 or more and below workers ({self.workers})")
        _check(1 <= self.port <= 65535, f"{path}.port", "must be between 1 and 65535")
        _check(self.threads >= 1, f"{path}.threads", "must be at least 1")
        _check(self.connection_limit >= 1, f"{path}.connection_limit", "must be at least 1")
        _check(self.max_request_body_mb > 0, f"{path}.max_request_body_mb", "must be positive")
        _check(self.header_timeout > 0, f"{path}.header_timeout", "must be positive")
        _check(self.max_header_kb >= 1, f"{path}.max_header_kb", "must be at least 1")
        _check(self.shutdown_grace >= 0, f"{path}.shutdown_grace", "must be 0 or more")


@dataclass
class HttpClientSettings:
    max_keepalive_connections: int = 200
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
    # per provider that serves several models: the (provider, model) breakers kept, least
    # recently used dropped past it (model names come from clients: memory stays bounded)
    max_model_breakers: int = 100

    def validate(self, path):
        for name in ("failure_threshold", "success_threshold", "window", "min_threshold",
                     "min_calls", "max_model_breakers"):
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
    # key: each API key sees only the answers and summaries made for it; shared: every key
    # sees every other's (more hits, but a key can learn what others asked: docs/security.md)
    scope: str = "key"
    # requests that offer tools (agents' turns) are not cached unless this is on: an agent's
    # turn is seldom repeated, and a stored answer would replay its tool calls
    tools: bool = False

    def validate(self, path):
        for name in ("response_cache_size", "summary_cache_size"):
            _check(getattr(self, name) >= 1, f"{path}.{name}", "must be at least 1")
        for name in ("response_cache_ttl", "summary_cache_ttl", "max_memory_mb"):
            _check(getattr(self, name) > 0, f"{path}.{name}", "must be positive")
        _check(self.stale_ttl >= 0, f"{path}.stale_ttl", "must be 0 or more")
        _check(self.scope in ("key", "shared"), f"{path}.scope",
               f"must be key or shared, got {self.scope!r}")


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
        for name in ("cleanup_interval", "sample_interval"):
            _check(getattr(self, name) > 0, f"{path}.{name}", "must be positive")
        _check(len(self.gc_thresholds) == 3 and all(t >= 0 for t in self.gc_thresholds),
               f"{path}.gc_thresholds", "must be three numbers, 0 or more")
        _check(self.leak_snapshots >= 2, f"{path}.leak_snapshots", "must be at least 2")


@dataclass
class ObservabilitySettings:
    metrics_enabled: bool = True  # /metrics and the per-request counters
    access_log: bool = True  # one line per request on stdout
    access_log_format: str = "json"  # json or text
    # OpenTelemetry traces (app/observability/tracing.py), sent over OTLP/HTTP; "": off, at no
    # cost. From the standard variables: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, or
    # OTEL_EXPORTER_OTLP_ENDPOINT with /v1/traces appended.
    traces_endpoint: str = ""
    traces_sample_ratio: float = 1.0  # OTEL_TRACES_SAMPLER_ARG: share of new traces kept
    service_name: str = "llm-proxy"  # OTEL_SERVICE_NAME

    def validate(self, path):
        _check(self.access_log_format in ("json", "text"), f"{path}.access_log_format",
               f"must be json or text, got {self.access_log_format!r}")
        _check(not self.traces_endpoint or self.traces_endpoint.startswith(("http://", "https://")),
               f"{path}.traces_endpoint", "must be an http:// or https:// URL")
        _check(0.0 <= self.traces_sample_ratio <= 1.0, f"{path}.traces_sample_ratio",
               "must be between 0 and 1")


@dataclass
class ConsoleSettings:
    """The operator console at ``/console`` (app/console/), signed in with the admin key. Served
    in development, and in production only when ADMIN_API_KEY is set (``Settings.console_on``)."""
    enabled: bool = True  # CONSOLE_ENABLED; false: /console is not served
    # CONSOLE_SESSION_SECRET signs the session cookie; "": a random one per start (workers share
    # the supervisor's), so a restart signs everyone out
    session_secret: str = field(default="", repr=False)
    session_hours: float = 12.0  # CONSOLE_SESSION_HOURS: a sign-in lasts this long
    refresh_seconds: float = 5.0  # pages refresh their figures this often (JavaScript); 0: never
    sign_in_attempts: int = 5  # wrong admin keys one address may try per minute

    def validate(self, path):
        for name in ("session_hours", "sign_in_attempts"):
            _check(getattr(self, name) > 0, f"{path}.{name}", "must be positive")
        _check(self.refresh_seconds >= 0, f"{path}.refresh_seconds", "must be 0 (never) or more")


PRICE_FIELDS = ("input", "output", "cached_input", "cache_write")  # USD per million tokens


@dataclass
class PricingSettings:
    """What answers cost (app/pricing.py): ``models`` entries, each ``model`` (a name or a glob
    pattern) with its prices, go over the built-in table, which ``defaults: false`` turns off."""
    defaults: bool = True
    models: list[dict[str, object]] = field(default_factory=list)

    def validate(self, path):
        seen = set()
        for i, entry in enumerate(self.models):
            where = f"{path}.models[{i}]"
            _check(isinstance(entry, dict), where, "must be a mapping with model, input and "
                   "output (USD per million tokens)")
            for name in sorted(set(entry) - {"model", *PRICE_FIELDS}):
                raise SettingsError(f"unknown field (known: model, {', '.join(PRICE_FIELDS)})",
                                    f"{where}.{name}")
            model = entry.get("model")
            _check(isinstance(model, str) and model.strip() != "", f"{where}.model",
                   "must be a model name or glob pattern")
            model = model.strip()
            _check(model not in seen, f"{where}.model", f"{model!r} is priced twice")
            seen.add(model)
            for name in PRICE_FIELDS:
                value = entry.get(name)
                if value is None:
                    _check(name not in ("input", "output"), f"{where}.{name}",
                           "required (USD per million tokens; 0 for none)")
                    continue
                _check(isinstance(value, (int, float)) and not isinstance(value, bool)
                       and math.isfinite(value) and value >= 0, f"{where}.{name}",
                       f"must be a number of USD per million tokens, 0 or more, got {value!r}")


@dataclass
class AuthSettings:
    api_keys_required: bool = False  # API_KEYS_REQUIRED; without it, no key = anonymous tenant
    api_keys: list[dict[str, object]] = field(default_factory=list)  # {id, sha256, limits...}
    env_keys: str = field(default="", repr=False, metadata={  # hashed at load
        NOT_IN_FILE: "plain client keys come from PROXY_API_KEYS=\"id:key,...\"; the file takes "
                     "their sha256 in api_keys"})
    models: list[str] = field(default_factory=list)  # default allow-list (empty: every model)
    requests_per_minute: int = 0  # RATE_LIMIT_REQUESTS per key and for anonymous; 0: no limit
    tokens_per_minute: int = 0
    max_in_flight: int = 0  # default per key; 0: none, tenant_in_flight_share applies
    # The fraction of a process's request slots (Settings.max_in_flight) a key without a
    # max_in_flight may hold at once; 0: no such cap. The anonymous tenant of a deployment
    # without keys is never capped by it: it is the only tenant.
    tenant_in_flight_share: float = 0.5
    # answer tokens a request reserves from its key's tokens_per_minute when it sets no
    # max_tokens (besides its estimated prompt); settled to the real usage at the end
    reserve_completion_tokens: int = 1024
    window: float = 60.0  # seconds the per-minute limits refer to
    metrics_require_key: bool = False  # /metrics needs the admin key or a client key
    providers_require_admin: bool = False  # /providers needs the admin key (not a client key)

    def validate(self, path):
        _check(self.window > 0, f"{path}.window", "must be positive")
        for name in LIMIT_FIELDS:
            _check(getattr(self, name) >= 0, f"{path}.{name}", "must be 0 (no limit) or more")
        _check(0 <= self.tenant_in_flight_share <= 1, f"{path}.tenant_in_flight_share",
               "must be a fraction from 0 (no default share) to 1")
        _check(self.reserve_completion_tokens >= 0, f"{path}.reserve_completion_tokens",
               "must be 0 or more")
        try:
            self.client_keys()
        except ValueError as e:
            raise SettingsError(str(e), path) from None

    def client_keys(self) -> ClientKeys:
        """The client keys, checked and hashed (``app.auth.KeyStore`` serves them); ValueError
        naming a bad entry."""
        # max_in_flight 0 here is no default: each key then gets the in-flight share
        defaults = {"models": self.models, "requests_per_minute": self.requests_per_minute,
                    "tokens_per_minute": self.tokens_per_minute,
                    "max_in_flight": self.max_in_flight or None}
        return parse_client_keys(self.api_keys, self.env_keys, required=self.api_keys_required,
                                 defaults=defaults)

    def in_flight_share(self, capacity: int) -> int | None:
        """The requests a key without a max_in_flight may hold at once in a process that serves
        ``capacity`` at once (``Settings.max_in_flight``): at least 1; None when there is no
        share (``tenant_in_flight_share`` 0)."""
        if not self.tenant_in_flight_share:
            return None
        return max(1, int(capacity * self.tenant_in_flight_share))


# -- client API keys: read and checked here, so that a bad one stops start-up -----------------

ANONYMOUS = "anonymous"  # the id requests without a key run as: no configured key may take it
MIN_PLAIN_KEY_LENGTH = 16
LIMIT_FIELDS = ("requests_per_minute", "tokens_per_minute", "max_in_flight")
ENTRY_FIELDS = {"id", "sha256", "models", *LIMIT_FIELDS}
DEFAULT_FIELDS = {"models", *LIMIT_FIELDS}
_KEY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")


@dataclass(frozen=True)
class KeyRecord:
    """One configured key: its id, the SHA-256 of the key (hex), and its resolved limits.

    The digest is left out of the repr: it is not the secret, but it has no business in logs.
    """

    id: str
    sha256: str = field(repr=False)
    models: tuple[str, ...] = ()
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_in_flight: int | None = None


@dataclass(frozen=True)
class ClientKeys:
    """Every configured key, and the limits of a request without one (``anonymous``: a record
    with no digest, whose fields are the defaults)."""

    records: tuple[KeyRecord, ...]
    anonymous: KeyRecord
    required: bool

    @property
    def ids(self) -> list[str]:
        return [r.id for r in self.records]


def parse_client_keys(entries: list | None, env_value: str | None, *, required: bool,
                      defaults: Mapping | None = None,
                      env_name: str = "PROXY_API_KEYS") -> ClientKeys:
    """The keys from the YAML entries and the environment string, with the default limits.

    ``entries``: mappings with ``id``, ``sha256`` (64 hex characters) and optionally
    ``models``, ``requests_per_minute``, ``tokens_per_minute``, ``max_in_flight``.
    ``env_value``: ``"id1:key1,id2:key2"`` (see ``parse_env_keys``); these keys get the
    defaults. ``defaults``: the same limit fields and ``models``; they apply to the anonymous
    tenant and to every key that leaves a field out (or sets it to null). A limit of 0 is
    unlimited even where the default is not. A ``max_in_flight`` left None (by the key and the
    defaults) is the proxy's default in-flight share (``AuthSettings.tenant_in_flight_share``),
    except for the anonymous tenant of a deployment without keys, which gets 0 (unlimited).
    Raises ValueError naming the bad entry.
    """
    base = _key_defaults(defaults or {})
    records: list[KeyRecord] = []
    for i, entry in enumerate(entries or []):
        records.append(_key_record(entry, f"api_keys[{i}]", base))
    for key_id, key in parse_env_keys(env_value or "", env_name):
        records.append(KeyRecord(key_id, hash_key(key), *base))
    ids, digests = set(), {}
    for record in records:
        where = f"API key {record.id!r}"
        if record.id == ANONYMOUS:
            raise ValueError(f"{where}: the id {ANONYMOUS!r} is reserved")
        if record.id in ids:
            raise ValueError(f"{where}: the id is used twice")
        if record.sha256 in digests:
            raise ValueError(f"{where}: the same key is also configured as "
                             f"{digests[record.sha256]!r}")
        ids.add(record.id)
        digests[record.sha256] = record.id
    if required and not records:
        raise ValueError(f"API keys are required but none is configured "
                         f"(api_keys in the config file or {env_name})")
    if not records and base[3] is None:  # no keys: anonymous is the only tenant, it keeps
        base = (*base[:3], 0)              # every request slot (no default in-flight share)
    return ClientKeys(tuple(records), KeyRecord(ANONYMOUS, "", *base), required)


def parse_env_keys(value: str, env_name: str = "PROXY_API_KEYS") -> list[tuple[str, str]]:
    """``"id1:key1,id2:key2"`` as (id, key) pairs.

    Items are separated by commas, and each is ``id:key`` split at its first colon (the key may
    contain colons, not commas). Spaces around items, ids and keys are ignored, and so are
    empty items. Errors name the item by position and id, never by its text.
    """
    out = []
    for n, item in enumerate(value.split(","), 1):
        item = item.strip()
        if not item:
            continue
        label = f"{env_name} item {n}"
        key_id, sep, key = item.partition(":")
        key_id, key = key_id.strip(), key.strip()
        if not sep:
            raise ValueError(f"{label}: must be id:key")
        check_key_id(key_id, label)
        label = f"{label} (id {key_id!r})"
        if len(key) < MIN_PLAIN_KEY_LENGTH:
            raise ValueError(f"{label}: the key must be at least {MIN_PLAIN_KEY_LENGTH} "
                             f"characters (python -m app.auth new-key makes one)")
        out.append((key_id, key))
    return out


def hash_key(key: str) -> str:
    """The SHA-256 of a key, as the lowercase hex that goes in the config file."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def check_key_id(key_id, label):
    """ValueError, starting with ``label``, unless ``key_id`` is a valid key id."""
    if not isinstance(key_id, str) or not _KEY_ID.fullmatch(key_id):
        raise ValueError(f"{label}: id must be 1-64 letters, digits, '.', '_' or '-', "
                         f"starting with a letter or digit")


def _key_record(entry, label, base) -> KeyRecord:
    if not isinstance(entry, Mapping):
        raise ValueError(f"{label}: must be a mapping with id and sha256")
    key_id = entry.get("id")
    check_key_id(key_id, label)
    label = f"{label} (id {key_id!r})"
    unknown = sorted(set(map(str, entry)) - ENTRY_FIELDS)
    if unknown:
        raise ValueError(f"{label}: unknown field {unknown[0]!r}"
                         + (" (configure the key's sha256, not the key)"
                            if unknown[0] in ("key", "api_key") else ""))
    digest = entry.get("sha256")
    if not isinstance(digest, str) or not _HEX64.fullmatch(digest.strip()):
        raise ValueError(f"{label}: sha256 must be 64 hex characters "
                         f"(python -m app.auth new-key prints one)")
    models, *limits = _key_limits(entry, label, base)
    return KeyRecord(key_id, digest.strip().lower(), models, *limits)


def _key_defaults(defaults: Mapping) -> tuple:
    unknown = sorted(set(map(str, defaults)) - DEFAULT_FIELDS)
    if unknown:
        raise ValueError(f"default limits: unknown field {unknown[0]!r}")
    return _key_limits(defaults, "default limits", ((), None, None, None))


def _key_limits(entry: Mapping, label: str, base: tuple) -> tuple:
    """(models, requests_per_minute, tokens_per_minute, max_in_flight); absent/None: ``base``.
    A rate of 0 is None (unlimited); a max_in_flight of 0 stays 0 (unlimited), since None
    there means "none of its own": the proxy's default in-flight share applies."""
    models = entry.get("models")
    if models is None:
        models = base[0]
    elif not isinstance(models, (list, tuple)) or not all(
            isinstance(m, str) and m.strip() for m in models):
        raise ValueError(f"{label}: models must be a list of model names or glob patterns")
    out = [tuple(m.strip() for m in models)]
    for name, default in zip(LIMIT_FIELDS, base[1:]):
        value = entry.get(name)
        if value is None:
            out.append(default)
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{label}: {name} must be a whole number, 0 or more "
                             f"(0: unlimited), got {value!r}")
        out.append(value if name == "max_in_flight" else value or None)
    return tuple(out)


@dataclass
class RedisSettings:
    url: str = field(default="", repr=False)  # REDIS_URL (may hold a password); empty: in-process
    prefix: str = "llmproxy:"  # keys of this deployment
    timeout: float = 0.1  # seconds for a Redis call; slower counts as a failure
    failure_threshold: int = 3  # Redis failures in a row before the proxy stops asking it
    recovery_timeout: float = 5.0  # seconds before it tries Redis again
    local_fallback_mb: float = 64.0  # the in-process caches used while Redis is away

    def validate(self, path):
        if self.url:
            _check(self.url.startswith(("redis://", "rediss://", "unix://")), f"{path}.url",
                   "must be a redis://, rediss:// or unix:// URL")
        for name in ("timeout", "recovery_timeout"):
            _check(getattr(self, name) > 0, f"{path}.{name}", "must be positive")
        _check(self.failure_threshold >= 1, f"{path}.failure_threshold", "must be at least 1")


@dataclass
class DatabaseSettings:
    """Keys, spend and the request log (app/store/): SQLite at ``path`` unless ``url`` names a
    PostgreSQL database. Never on the request path: reads come from an in-process copy
    refreshed every ``refresh_interval`` seconds (and on change), writes go through a queue of
    ``queue_size`` rows to a background writer that inserts up to ``batch_size`` at a time."""
    enabled: bool = True  # DATABASE_ENABLED; false: no admin keys API, spend or request log
    url: str = field(default="", repr=False)  # DATABASE_URL: postgresql://... (may hold a password)
    path: str = "data/llm-proxy.db"  # DATABASE_PATH: the SQLite file when url is empty
    migrate: bool = True  # bring the schema to the latest version at start-up (Alembic)
    refresh_interval: float = 5.0  # seconds between reloads of keys and spend from the database
    queue_size: int = 10000  # rows waiting for the writer; more are dropped, counted and logged
    batch_size: int = 500  # rows per insert
    flush_interval: float = 0.2  # seconds the writer lets a batch fill before it writes
    request_log: bool = True  # one row per proxied request
    log_bodies: bool = False  # keep request bodies (and whole answers) in the request log
    log_body_max_kb: int = 16  # each kept body truncated to this size
    redact_patterns: list[str] = field(default_factory=list)  # regexes blanked in kept bodies
    retention_days: float = 30.0  # request log rows older than this are deleted; 0: kept forever
    rotation_grace: float = 86400.0  # seconds a rotated key's old secret still works

    @property
    def target(self) -> str:
        """The SQLAlchemy URL: PostgreSQL through psycopg 3, or the SQLite file."""
        if not self.url:
            return f"sqlite:///{self.path}"
        scheme, sep, rest = self.url.partition("://")
        return f"postgresql+psycopg://{rest}" if scheme in ("postgres", "postgresql") else self.url

    def validate(self, path):
        if self.url:
            _check(self.url.startswith(("postgresql://", "postgres://", "postgresql+psycopg://",
                                        "sqlite:///")),
                   f"{path}.url", "must be a postgresql:// URL (or sqlite:///FILE)")
        else:
            _check(self.path.strip() != "", f"{path}.path", "must name the SQLite file")
        for name in ("refresh_interval", "flush_interval"):
            _check(getattr(self, name) > 0, f"{path}.{name}", "must be positive")
        for name in ("queue_size", "batch_size", "log_body_max_kb"):
            _check(getattr(self, name) >= 1, f"{path}.{name}", "must be at least 1")
        _check(self.retention_days >= 0, f"{path}.retention_days", "must be 0 (forever) or more")
        _check(self.rotation_grace >= 0, f"{path}.rotation_grace", "must be 0 or more seconds")
        for i, pattern in enumerate(self.redact_patterns):
            try:
                re.compile(pattern)
            except re.error as e:
                raise SettingsError(f"not a regular expression: {e}",
                                    f"{path}.redact_patterns[{i}]") from None


@dataclass
class RoutingSettings:
    strategy: str = "weighted"  # among equal priority: weighted (random by weight) or least_in_flight
    max_in_flight: int = 0  # requests in the proxy at once; 0: threads less a few kept free
    provider_max_in_flight: int = 0  # per provider unless it sets its own; 0: 3/4 of max_in_flight
    model_refresh_interval: float = 600.0  # seconds between asking upstreams their models; 0: never

    def validate(self, path):
        _check(self.strategy in ("weighted", "least_in_flight"), f"{path}.strategy",
               f"must be weighted or least_in_flight, got {self.strategy!r}")
        _check(self.max_in_flight >= 0, f"{path}.max_in_flight", "must be 0 (derived) or more")
        _check(self.provider_max_in_flight >= 0, f"{path}.provider_max_in_flight",
               "must be 0 (derived) or more")
        _check(self.model_refresh_interval >= 0, f"{path}.model_refresh_interval",
               "must be 0 (never) or positive")


@dataclass
class ProviderSettings:
    name: str
    type: str
    base_url: str = ""
    api_key_env: str = ""  # the variable that holds the key; its value is read at load
    models: list[str] = field(default_factory=list)
    aliases: dict[str, str] = field(default_factory=dict)
    enabled: bool = True
    priority: int = 100
    weight: float = 1.0  # share of traffic among providers of equal priority
    max_in_flight: int = 0  # bulkhead; 0: routing.provider_max_in_flight
    timeout: float = 0.0  # 0: the http_client timeout
    headers: dict[str, str] = field(default_factory=dict)
    api_version: str = "2024-10-21"  # azure_openai only
    stream_usage: bool = True  # openai, azure_openai: ask streams' usage (stream_options)
    # openai, azure_openai: the upstream speaks the Responses API, so /v1/responses is passed
    # through (None: yes for OpenAI's own base_url and for Azure, no for other compatibles)
    responses: bool | None = None
    max_tokens_default: int = 4096  # anthropic only: its API requires max_tokens
    latency_ms: float = 0.0  # mock only: delay before the answer
    chunk_delay_ms: float = 0.0  # mock only: delay between streamed chunks
    chunks: int = 5  # mock only: chunks per streamed answer
    embedding_dimensions: int = 16  # mock only
    api_key: str = field(default="", repr=False, metadata={  # resolved by build_settings
        NOT_IN_FILE: "name the variable that holds the key in api_key_env"})

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
        _check(self.responses is None or isinstance(self.responses, bool), f"{path}.responses",
               f"expected true or false, got {self.responses!r}")
        _check(not self.responses or self.type in ("openai", "azure_openai"), f"{path}.responses",
               "only openai and azure_openai providers can speak the Responses API natively")

    @property
    def speaks_responses(self) -> bool:
        """Whether ``/v1/responses`` goes to this provider as it is (pass-through) rather than
        translated to Chat Completions: ``responses`` when set, else OpenAI itself and Azure."""
        if self.responses is not None:
            return self.responses
        if self.type == "azure_openai":
            return True
        return self.type == "openai" and urlsplit(self.base_url).hostname == "api.openai.com"


@dataclass
class Settings:
    environment: str = "development"
    version: str = field(default=VERSION, metadata={NOT_IN_FILE: "the proxy's own version"})
    log_level: str = "INFO"
    config_path: str = field(default="", metadata={
        NOT_IN_FILE: "the loader records where it found the file (PROXY_CONFIG)"})
    admin_api_key: str = field(default="", repr=False, metadata={  # unset: /debug/* is disabled
        NOT_IN_FILE: "the admin key comes from ADMIN_API_KEY"})
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
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    observability: ObservabilitySettings = field(default_factory=ObservabilitySettings)
    console: ConsoleSettings = field(default_factory=ConsoleSettings)
    pricing: PricingSettings = field(default_factory=PricingSettings)
    providers: list[ProviderSettings] = field(default_factory=list)

    @property
    def max_in_flight(self) -> int:
        """Requests served at once; the threads above it stay free to refuse quickly."""
        return self.routing.max_in_flight or max(1, self.server.threads - max(2, self.server.threads // 8))

    @property
    def console_on(self) -> bool:
        """Whether /console is served: in production only with an admin key to sign in with."""
        return self.console.enabled and (self.environment == "development"
                                         or bool(self.admin_api_key))

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
        self.database.validate("database")
        self.observability.validate("observability")
        self.console.validate("console")
        self.pricing.validate("pricing")
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
    "cache": {"max_memory_mb": 1024},
    "auth": {"api_keys_required": True, "requests_per_minute": 10000,
             # what one tenant must not see of the others' setup and traffic
             "metrics_require_key": True, "providers_require_admin": True},
}

# Environment variable -> (section or None, field).
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
    "SHUTDOWN_GRACE": ("server", "shutdown_grace"),
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
    "MODEL_REFRESH_INTERVAL": ("routing", "model_refresh_interval"),
    "CACHE_ENABLED": ("cache", "enabled"),
    "CACHE_MAX_MEMORY_MB": ("cache", "max_memory_mb"),
    "CACHE_RESPONSE_TTL": ("cache", "response_cache_ttl"),
    "CACHE_STALE_TTL": ("cache", "stale_ttl"),
    "CACHE_SCOPE": ("cache", "scope"),
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
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": ("observability", "traces_endpoint"),
    "OTEL_TRACES_SAMPLER_ARG": ("observability", "traces_sample_ratio"),
    "OTEL_SERVICE_NAME": ("observability", "service_name"),
    "CONSOLE_ENABLED": ("console", "enabled"),
    "CONSOLE_SESSION_SECRET": ("console", "session_secret"),
    "CONSOLE_SESSION_HOURS": ("console", "session_hours"),
    "PRICING_DEFAULTS": ("pricing", "defaults"),
    "API_KEYS_REQUIRED": ("auth", "api_keys_required"),
    "PROXY_API_KEYS": ("auth", "env_keys"),
    "RATE_LIMIT_REQUESTS": ("auth", "requests_per_minute"),
    "RATE_LIMIT_TOKENS": ("auth", "tokens_per_minute"),
    "TENANT_IN_FLIGHT_SHARE": ("auth", "tenant_in_flight_share"),
    "RESERVE_COMPLETION_TOKENS": ("auth", "reserve_completion_tokens"),
    "METRICS_REQUIRE_KEY": ("auth", "metrics_require_key"),
    "PROVIDERS_REQUIRE_ADMIN": ("auth", "providers_require_admin"),
    "WORKERS": ("server", "workers"),
    "PIN_WORKERS": ("server", "pin_workers"),
    "WORKER_INDEX": ("server", "worker_index"),  # set by the supervisor for each worker
    "REDIS_URL": ("redis", "url"),
    "DATABASE_ENABLED": ("database", "enabled"),
    "DATABASE_URL": ("database", "url"),
    "DATABASE_PATH": ("database", "path"),
    "DATABASE_MIGRATE": ("database", "migrate"),
    "DATABASE_REFRESH_INTERVAL": ("database", "refresh_interval"),
    "REQUEST_LOG_ENABLED": ("database", "request_log"),
    "REQUEST_LOG_BODIES": ("database", "log_bodies"),
    "REQUEST_LOG_RETENTION_DAYS": ("database", "retention_days"),
}

# With no config the mock serves every model name ("*"), so a fresh run works with any
# client's default model (Claude Code's claude-*, Codex's gpt-*); the names are what it lists.
MOCK_PROVIDER = {
    "name": "mock", "type": "mock", "priority": 1,
    "models": ["mock-model", "gpt-4o-mini", "text-embedding-3-small", "*"],
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
    """Build and validate the settings from an environment mapping and the YAML file.

    ``environ`` defaults to ``os.environ``; when a mapping is given, nothing else is read from
    the process environment (provider keys included)."""
    environ = os.environ if environ is None else environ
    path = config_path or environ.get("PROXY_CONFIG") or "config.yaml"
    found = os.path.exists(path)
    if not found and (config_path or environ.get("PROXY_CONFIG")):
        raise SettingsError(f"config file {path}: not found")
    from_file = _read_yaml(path) if found else {}
    _refuse_fields_not_in_file(Settings, from_file, "")
    data: dict = {}
    # The profile goes under the file, but the file may choose it: ENVIRONMENT, else the file's.
    if environ.get("ENVIRONMENT", from_file.get("environment")) == "production":
        _merge(data, PRODUCTION_PROFILE)
    _merge(data, from_file)
    if found:
        data["config_path"] = path
    set_by = {}  # field path -> the variable that set it, for error messages
    for var, (section, name) in ENV_VARS.items():
        if var.startswith("OTEL_") and not environ.get(var, "").strip():
            continue  # OpenTelemetry's rule: an empty variable is unset (compose passes ${VAR:-})
        if var in environ:
            target = data.setdefault(section, {}) if section else data
            if not isinstance(target, dict):  # the file's section is no mapping: say so
                raise SettingsError(f"expected a mapping, got {type(target).__name__}", section)
            target[name] = environ[var]
            set_by[_join(section or "", name)] = var
    otlp = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    # The spec's base URL, unless the traces' own URL is set (an empty one is unset).
    if otlp and not environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip():
        data.setdefault("observability", {})["traces_endpoint"] = otlp.rstrip("/") + "/v1/traces"
        set_by["observability.traces_endpoint"] = "OTEL_EXPORTER_OTLP_ENDPOINT"
    if "providers" not in data:
        data["providers"] = default_providers(environ)
    try:
        return build_settings(data, environ)
    except SettingsError as e:
        if e.path in set_by:
            raise SettingsError(e.reason, f"{set_by[e.path]} ({e.path})") from None
        raise


def build_settings(data: dict, environ=None) -> Settings:
    """Settings from a plain dict (the YAML shape); used by tests too.

    Each provider's ``api_key`` is read here from ``environ`` (default ``os.environ``) by the
    name in its ``api_key_env``, unless the dict gives it."""
    environ = os.environ if environ is None else environ
    settings = _convert(Settings, data, "")
    for provider in settings.providers:
        if provider.api_key_env and not provider.api_key:
            provider.api_key = environ.get(provider.api_key_env, "")
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
        raise SettingsError(_yaml_problem(path, e)) from None
    except OSError as e:
        raise SettingsError(f"config file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise SettingsError(f"config file {path}: not UTF-8 text ({e.reason} at byte "
                            f"{e.start})") from None
    if not isinstance(data, dict):
        raise SettingsError(f"config file {path}: must be a mapping of settings")
    return data


def _yaml_problem(path, e: yaml.YAMLError) -> str:
    """The parser's own words and where: ``config file X, line 3, column 10: invalid YAML: ...``."""
    problem = getattr(e, "problem", None)
    if not problem:
        return f"config file {path}: invalid YAML: {e}"
    mark = getattr(e, "problem_mark", None)
    where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    context = getattr(e, "context", None)
    return (f"config file {path}{where}: invalid YAML: {problem}"
            + (f" ({context})" if context else ""))


def _refuse_fields_not_in_file(tp, value, path):
    """Keys, and what the loader fills in, never come from the file: say where they come from."""
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        hints = typing.get_type_hints(tp)
        for f in dataclasses.fields(tp):
            if f.name in value:
                if NOT_IN_FILE in f.metadata:
                    raise SettingsError(f"not in the config file: {f.metadata[NOT_IN_FILE]}",
                                        _join(path, f.name))
                _refuse_fields_not_in_file(hints[f.name], value[f.name], _join(path, f.name))
    elif typing.get_origin(tp) is list and isinstance(value, list):
        (item,) = typing.get_args(tp)
        for i, v in enumerate(value):
            _refuse_fields_not_in_file(item, v, f"{path}[{i}]")


def _merge(into: dict, other: dict):
    """Merge ``other`` into ``into``, copying: ``other`` (the profile, say) is never shared."""
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = copy.deepcopy(value)


def _check(ok, path, message):
    if not ok:
        raise SettingsError(message, path)


def _convert(tp, value, path):
    """Coerce a YAML/env value to the annotated type, naming the field on failure."""
    label = path or "settings"
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise SettingsError(f"expected a mapping, got {type(value).__name__}", label)
        hints = typing.get_type_hints(tp)
        known = {f.name for f in dataclasses.fields(tp)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise SettingsError("unknown setting", _join(path, unknown[0]))
        missing = [f.name for f in dataclasses.fields(tp)
                   if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                   and f.name not in value]
        if missing:
            raise SettingsError("required", _join(path, missing[0]))
        return tp(**{k: _convert(hints[k], v, _join(path, k)) for k, v in value.items()})
    origin = typing.get_origin(tp)
    if origin is list:
        if not isinstance(value, list):
            raise SettingsError(f"expected a list, got {type(value).__name__}", label)
        (item,) = typing.get_args(tp)
        return [_convert(item, v, f"{label}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise SettingsError(f"expected a mapping, got {type(value).__name__}", label)
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
        raise SettingsError(f"expected true or false, got {value!r}", label)
    if tp in (int, float):
        if isinstance(value, bool):
            raise SettingsError(f"expected a number, got {value!r}", label)
        kind = "an integer" if tp is int else "a number"
        if tp is int and isinstance(value, float):
            raise SettingsError(f"expected {kind}, got {value!r}", label)
        try:
            return tp(value)
        except (TypeError, ValueError):
            raise SettingsError(f"expected {kind}, got {value!r}", label) from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise SettingsError(f"expected text, got {type(value).__name__}", label)
        return str(value)
    return value


def _join(path, name):
    return f"{path}.{name}" if path else name
