"""Client API keys: who is calling, which models they may use, and the limits that apply to them.

Keys are configured as SHA-256 digests (hex) in the YAML file, or as plain keys in an environment
string that is hashed at load; the store keeps only digests and ids. ``python -m app.auth
new-key`` prints a new random key, its digest, and the YAML entry to paste.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import hmac
import re
import secrets
import sys
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from app.errors import ProxyError

ANONYMOUS = "anonymous"
KEY_PREFIX = "sk-proxy-"
MIN_PLAIN_KEY_LENGTH = 16
LIMIT_FIELDS = ("requests_per_minute", "tokens_per_minute", "max_in_flight")
ENTRY_FIELDS = {"id", "sha256", "models", *LIMIT_FIELDS}
DEFAULT_FIELDS = {"models", *LIMIT_FIELDS}

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_CHALLENGE = {"WWW-Authenticate": "Bearer"}


class AuthError(ProxyError):
    """The request carries no API key where one is required, or a key the proxy does not know."""
    status, type, code = 401, "authentication_error", "invalid_api_key"

    def __init__(self, message, *, code="invalid_api_key"):
        super().__init__(message, code=code, headers=dict(_CHALLENGE))


class ModelForbidden(ProxyError):
    """The client's key may not use the requested model."""
    status, type, code = 403, "permission_error", "model_not_allowed"


@dataclass(frozen=True)
class Tenant:
    """The identity a request runs as: a configured key's id, or the anonymous client.

    ``models`` are glob patterns (case-sensitive, like the router's); empty allows every model.
    A limit of None or 0 means unlimited.
    """

    id: str
    models: tuple[str, ...] = ()
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_in_flight: int | None = None
    anonymous: bool = False

    def allows_model(self, model: str) -> bool:
        return not self.models or any(fnmatch.fnmatchcase(model, p) for p in self.models)

    def check_model(self, model: str) -> None:
        """Raise ModelForbidden unless this tenant may use ``model``."""
        if not self.allows_model(model):
            who = "Anonymous clients" if self.anonymous else f"API key {self.id!r}"
            raise ModelForbidden(f"{who} may not use the model {model!r}.", param="model")


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

    def tenant(self) -> Tenant:
        return Tenant(self.id, self.models, self.requests_per_minute, self.tokens_per_minute,
                      self.max_in_flight)


class KeyStore:
    """Resolves a request's headers to a Tenant.

    The key is read from ``Authorization: Bearer <key>`` or ``X-API-Key: <key>`` (if both are
    sent they must agree). With ``required``, a request without a key is refused (401
    missing_api_key). Without it, such a request runs as the anonymous tenant, whose limits are
    the configured defaults. A key that is sent but unknown is refused (401 invalid_api_key)
    either way: a client that sends a key expects to be identified, and quietly downgrading a
    mistyped or revoked key to anonymous would hide the mistake, hand a revoked key's holder
    whatever anonymous may do, and spend the shared anonymous budget on their behalf.

    With no keys configured and ``required`` false, authentication is off: every request is
    anonymous and any key sent is ignored. This keeps today's behaviour for deployments that
    configure no keys, where OpenAI SDK clients always send some key (often a provider's).

    Comparison. The presented key is hashed with SHA-256 and the digest is compared with
    ``hmac.compare_digest`` against every configured digest, without stopping at a match, so
    the time taken does not depend on which key matched or how much of a digest did. Key
    counts are small (tens), so the linear scan costs microseconds. (A dict lookup by digest
    would also be safe in practice, since timing can at most reveal something about the digest
    of a secret the attacker chose, but the scan needs no argument.)
    """

    def __init__(self, keys: Iterable[KeyRecord], *, required: bool,
                 anonymous: Tenant | None = None):
        self.records = list(keys)
        self.required = required
        self.anonymous = anonymous or Tenant(ANONYMOUS, anonymous=True)
        self._entries = [(bytes.fromhex(r.sha256), r.tenant()) for r in self.records]

    @property
    def enabled(self) -> bool:
        """Whether keys are checked at all (some are configured, or they are required)."""
        return bool(self._entries) or self.required

    @property
    def ids(self) -> list[str]:
        return [r.id for r in self.records]

    def authenticate(self, headers: Mapping[str, str]) -> Tenant:
        """The tenant the request runs as; AuthError (401) for a missing or unknown key."""
        if not self.enabled:
            return self.anonymous
        key = presented_key(headers)
        if key is None:
            if self.required:
                raise AuthError("No API key was sent. Send 'Authorization: Bearer <key>' or "
                                "'X-API-Key: <key>'.", code="missing_api_key")
            return self.anonymous
        digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
        found = None
        for known, tenant in self._entries:
            if hmac.compare_digest(digest, known) and found is None:
                found = tenant
        if found is None:
            raise AuthError("The API key is not valid.")
        return found

    @classmethod
    def from_config(cls, entries: list[dict] | None, env_value: str | None, *, required: bool,
                    defaults: Mapping | None = None, env_name: str = "PROXY_API_KEYS") -> KeyStore:
        """A store from the YAML entries, the environment string, and the default limits.

        ``entries``: mappings with ``id``, ``sha256`` (64 hex characters) and optionally
        ``models``, ``requests_per_minute``, ``tokens_per_minute``, ``max_in_flight``.
        ``env_value``: ``"id1:key1,id2:key2"`` (see ``parse_env_keys``); these keys get the
        defaults. ``defaults``: the same limit fields and ``models``; they apply to the anonymous
        tenant and to every key that leaves a field out (or sets it to null). A limit of 0 is
        unlimited even where the default is not. Raises ValueError naming the bad entry.
        """
        base = _defaults(defaults or {})
        records: list[KeyRecord] = []
        for i, entry in enumerate(entries or []):
            records.append(_record(entry, f"api_keys[{i}]", base))
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
        anonymous = Tenant(ANONYMOUS, *base, anonymous=True)
        return cls(records, required=required, anonymous=anonymous)


def hash_key(key: str) -> str:
    """The SHA-256 of a key, as the lowercase hex that goes in the config file."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    """A new random key: 256 bits, URL-safe, with a prefix that makes it easy to recognise."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key the client sent, or None; AuthError when the headers are malformed or disagree."""
    auth = _header(headers, "Authorization")
    bearer = None
    if auth is not None and auth.strip():
        scheme, _, rest = auth.strip().partition(" ")
        if scheme.lower() != "bearer":
            raise AuthError("The Authorization header must be 'Bearer <key>'.")
        bearer = rest.strip() or None
    api_key = (_header(headers, "X-API-Key") or "").strip() or None
    if bearer is not None and api_key is not None and not hmac.compare_digest(
            bearer.encode("utf-8", "surrogateescape"), api_key.encode("utf-8", "surrogateescape")):
        raise AuthError("The Authorization and X-API-Key headers carry different keys.")
    return bearer or api_key


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
        _check_id(key_id, label)
        label = f"{label} (id {key_id!r})"
        if len(key) < MIN_PLAIN_KEY_LENGTH:
            raise ValueError(f"{label}: the key must be at least {MIN_PLAIN_KEY_LENGTH} "
                             f"characters (python -m app.auth new-key makes one)")
        out.append((key_id, key))
    return out


def _record(entry, label, base) -> KeyRecord:
    if not isinstance(entry, Mapping):
        raise ValueError(f"{label}: must be a mapping with id and sha256")
    key_id = entry.get("id")
    _check_id(key_id, label)
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
    models, *limits = _limits(entry, label, base)
    return KeyRecord(key_id, digest.strip().lower(), models, *limits)


def _defaults(defaults: Mapping) -> tuple:
    unknown = sorted(set(map(str, defaults)) - DEFAULT_FIELDS)
    if unknown:
        raise ValueError(f"default limits: unknown field {unknown[0]!r}")
    return _limits(defaults, "default limits", ((), None, None, None))


def _limits(entry: Mapping, label: str, base: tuple) -> tuple:
    """(models, requests_per_minute, tokens_per_minute, max_in_flight); absent/None: ``base``."""
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
        out.append(value or None)
    return tuple(out)


def _check_id(key_id, label):
    if not isinstance(key_id, str) or not _ID.fullmatch(key_id):
        raise ValueError(f"{label}: id must be 1-64 letters, digits, '.', '_' or '-', "
                         f"starting with a letter or digit")


def _header(headers, name) -> str | None:
    value = headers.get(name)
    if value is None and isinstance(headers, dict):  # a plain dict is case-sensitive
        lower = name.lower()
        value = next((v for k, v in headers.items() if k.lower() == lower), None)
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.auth",
                                     description="Manage the proxy's client API keys.")
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("new-key", help="print a new random key, its sha256, and the "
                                               "config entry to paste")
    make.add_argument("--id", default=None, help="the key's id in logs and metrics")
    args = parser.parse_args(argv)
    key_id = args.id or f"key-{secrets.token_hex(4)}"
    try:
        _check_id(key_id, "--id")
    except ValueError as e:
        parser.error(str(e))
    key = new_key()
    digest = hash_key(key)
    print(f"key:    {key}")
    print(f"sha256: {digest}")
    print()
    print("The key is shown only this once: give it to the client. The config keeps the sha256:")
    print()
    print("auth:")
    print("  api_keys:")
    print(f"    - id: {key_id}")
    print(f"      sha256: {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
