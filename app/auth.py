"""Client API keys: who is calling, which models they may use, and the limits that apply to them.

Keys are configured as SHA-256 digests (hex) in the YAML file, or as plain keys in an environment
string that is hashed at load (``settings.parse_client_keys`` reads and checks both); the store
keeps only digests and ids. ``python -m app.auth new-key`` prints a new random key, its digest,
and the YAML entry to paste.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import hmac
import secrets
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Mapping

from app.errors import AuthError, ModelForbidden
from settings import ANONYMOUS, ClientKeys, KeyRecord, check_key_id, hash_key

if TYPE_CHECKING:  # types only
    from app.store.keys import KeyDirectory
    from app.store.spend import Budget

KEY_PREFIX = "sk-proxy-"


@dataclass(frozen=True)
class Tenant:
    """The identity a request runs as: a configured key's id, or the anonymous client.

    ``models`` are glob patterns (case-sensitive, like the router's); empty allows every model.
    A rate limit of None or 0 means unlimited. ``max_in_flight`` 0 is unlimited, and None is
    "none of its own": the proxy's default share of its request slots applies
    (``auth.tenant_in_flight_share``, see ``RateLimiter``), so one tenant cannot take every
    slot. The configured limits are the deployment's; a worker that keeps its own counts
    enforces its share of them (``WorkerShare``). ``budget``: what a key made through the admin
    API may spend (app/store/spend.py); None: no budget.
    """

    id: str
    models: tuple[str, ...] = ()
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_in_flight: int | None = None
    anonymous: bool = False
    budget: Budget | None = None

    @classmethod
    def of(cls, record: KeyRecord, *, anonymous: bool = False) -> Tenant:
        """The tenant a configured key runs as (``anonymous``: the defaults' record)."""
        return cls(record.id, record.models, record.requests_per_minute,
                   record.tokens_per_minute, record.max_in_flight, anonymous)

    def allows_model(self, model: str) -> bool:
        return not self.models or any(fnmatch.fnmatchcase(model, p) for p in self.models)

    def check_model(self, model: str) -> None:
        """Raise ModelForbidden unless this tenant may use ``model``."""
        if not self.allows_model(model):
            who = "Anonymous clients" if self.anonymous else f"API key {self.id!r}"
            raise ModelForbidden(f"{who} may not use the model {model!r}.", param="model")


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

    Keys come from the configuration (file and ``PROXY_API_KEYS``) and, with the database on,
    from ``directory``: the in-process copy of the keys made through the admin API
    (app/store/keys.py), reloaded in the background, so a lookup never waits on the database.

    Comparison. The presented key is hashed with SHA-256 and the digest looked up in a dict.
    Timing can at most reveal something about the digest of a secret the attacker chose, which
    tells nothing about any configured key; and there can be many keys now, which a constant-
    time scan would make every request pay for.
    """

    def __init__(self, keys: Iterable[KeyRecord], *, required: bool,
                 anonymous: Tenant | None = None, directory: KeyDirectory | None = None):
        self.records = list(keys)
        self.required = required
        # without keys the anonymous tenant is the only one: no default in-flight share
        self.anonymous = anonymous or Tenant(ANONYMOUS, max_in_flight=None if self.records else 0,
                                             anonymous=True)
        self._entries = {bytes.fromhex(r.sha256): Tenant.of(r) for r in self.records}
        self.directory = directory

    @property
    def enabled(self) -> bool:
        """Whether keys are checked at all (some are configured, or were ever made through the
        admin API, or they are required)."""
        return bool(self._entries) or self.required or (
            self.directory is not None and self.directory.made)

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
        found = self._entries.get(digest)
        if found is None and self.directory is not None:
            found = self.directory.lookup(digest)
        if found is None:
            raise AuthError("The API key is not valid.")
        return found

    @classmethod
    def from_keys(cls, keys: ClientKeys, directory: KeyDirectory | None = None) -> KeyStore:
        """The store of the configured keys (``AuthSettings.client_keys()``) and, with the
        database on, of the keys made through the admin API."""
        return cls(keys.records, required=keys.required,
                   anonymous=Tenant.of(keys.anonymous, anonymous=True), directory=directory)


def new_key() -> str:
    """A new random key: 256 bits, URL-safe, with a prefix that makes it easy to recognise."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def is_admin_key(given: str | None, expected: str | None) -> bool:
    """Whether ``given`` is the admin key ``expected`` (false when none is configured)."""
    # Compare digests so the comparison takes the same time whatever the lengths.
    return bool(expected and given) and hmac.compare_digest(
        hashlib.sha256(given.encode()).digest(), hashlib.sha256(expected.encode()).digest())


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
        check_key_id(key_id, "--id")
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
