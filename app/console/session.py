"""Who is signed in to the console: the signed session cookie, its CSRF token, sign-outs, and
the throttle on wrong admin keys.

The cookie holds a random session id and CSRF token, signed (itsdangerous, HMAC-SHA256) and
timestamped, never the admin key or anything derived from it. The signing key is derived from
the session secret and the admin key's SHA-256: rotating ``ADMIN_API_KEY`` (or the secret)
makes every cookie signed before invalid, so every session ends. A cookie older than
``console.session_hours`` is refused whatever its browser does with ``Max-Age``. A sign-out is
remembered (this process, and every process through Redis when it is set) until the cookie
would have expired anyway, so a copy of the cookie taken before does not outlive it.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from itsdangerous import BadSignature, TimestampSigner, URLSafeTimedSerializer

log = logging.getLogger("llm_proxy.console")

COOKIE = "llm_proxy_console"
COOKIE_PATH = "/console"
MAX_COOKIE = 512  # a real one is about 150 characters; longer is not looked at
MAX_SIGNED_OUT = 10_000  # sign-outs remembered in this process
MAX_ADDRESSES = 10_000  # addresses whose wrong keys are counted


@dataclass(frozen=True)
class Session:
    id: str
    csrf: str
    signed_in_at: float


class Sessions:
    """Makes and reads session cookies; ``wall`` is the clock of their timestamps. ``shared``:
    the proxy's SharedState (Redis), through which sign-outs reach every process."""

    def __init__(self, secret: bytes, admin_key: str, hours: float, *, wall=time.time,
                 shared=None, prefix: str = ""):
        self.max_age = max(1, int(hours * 3600))
        self.wall = wall
        self.shared = shared
        self._signed_out_key = f"{prefix}console:signed-out:"
        # The admin key enters only the signing key: no cookie carries it or its digest.
        key = hmac.new(secret, b"llm-proxy console session\x00"
                       + hashlib.sha256(admin_key.encode("utf-8", "surrogateescape")).digest(),
                       hashlib.sha256).digest()
        signer = type("ConsoleSigner", (TimestampSigner,),
                      {"get_timestamp": lambda _self: int(wall())})
        self._serializer = URLSafeTimedSerializer(
            key, salt="llm-proxy-console", signer=signer,
            signer_kwargs={"digest_method": hashlib.sha256})
        self._signed_out: OrderedDict[str, float] = OrderedDict()  # id -> when it would expire
        self._lock = threading.Lock()

    def make(self) -> tuple[Session, str]:
        """A new session and its cookie value."""
        session = Session(secrets.token_hex(16), secrets.token_urlsafe(32), self.wall())
        return session, self._serializer.dumps({"id": session.id, "csrf": session.csrf})

    def read(self, cookie: str | None) -> Session | None:
        """The session of a cookie value; None when absent, forged, expired or signed out."""
        if not cookie or len(cookie) > MAX_COOKIE:
            return None
        try:
            data, signed_at = self._serializer.loads(cookie, max_age=self.max_age,
                                                     return_timestamp=True)
        except BadSignature:  # its subclasses too: expired, malformed
            return None
        if not (isinstance(data, dict) and isinstance(data.get("id"), str)
                and isinstance(data.get("csrf"), str)):
            return None
        if self._is_signed_out(data["id"]):
            return None
        return Session(data["id"], data["csrf"], signed_at.timestamp())

    def sign_out(self, session: Session) -> None:
        """End ``session`` here and, through Redis, everywhere."""
        until = session.signed_in_at + self.max_age
        with self._lock:
            now = self.wall()
            # Sign-outs are rare (each needs a session): a full sweep of the expired is cheap.
            for expired in [i for i, end in self._signed_out.items() if end <= now]:
                del self._signed_out[expired]
            self._signed_out[session.id] = until
            while len(self._signed_out) > MAX_SIGNED_OUT:
                self._signed_out.popitem(last=False)
        if self.shared is not None:
            ttl = max(1, math.ceil(until - self.wall()))
            self.shared.guard.run(
                lambda client: client.set(self._signed_out_key + session.id, b"1", ex=ttl),
                lambda: None)

    def _is_signed_out(self, session_id: str) -> bool:
        with self._lock:
            if session_id in self._signed_out:
                return True
        if self.shared is None:
            return False
        return bool(self.shared.guard.run(
            lambda client: client.exists(self._signed_out_key + session_id), lambda: 0))

    def csrf_ok(self, session: Session, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(token.encode("utf-8", "surrogateescape"),
                                                   session.csrf.encode())


class SignInThrottle:
    """At most ``attempts`` wrong admin keys per address per ``window`` seconds; past them,
    every sign-in from the address is refused until the oldest wrong one is ``window`` old,
    the right key included (else guessing would go on, only its successes counted).

    Counted in this process: under ``WORKERS=N`` each worker allows ``attempts // N`` (at
    least one), so an address gets at most ``max(attempts, N)`` tries a minute in all. At most
    ``max_addresses`` addresses are remembered, the least recently wrong dropped first.
    """

    def __init__(self, attempts: int, *, window: float = 60.0, clock=time.monotonic,
                 workers: int = 1, max_addresses: int = MAX_ADDRESSES):
        self.attempts = max(1, attempts // max(1, workers))
        self.window = window
        self.clock = clock
        self.max_addresses = max_addresses
        self._wrong: OrderedDict[str, list[float]] = OrderedDict()
        self._lock = threading.Lock()

    def retry_after(self, address: str) -> float:
        """Seconds until ``address`` may try again; 0 when it may now."""
        now = self.clock()
        with self._lock:
            times = self._recent(address, now)
            if len(times) < self.attempts:
                return 0.0
            return max(0.0, times[0] + self.window - now)

    def wrong(self, address: str) -> None:
        """``address`` sent a wrong key."""
        now = self.clock()
        with self._lock:
            times = self._recent(address, now)
            times.append(now)
            del times[:-self.attempts]  # only the newest ``attempts`` matter
            self._wrong[address] = times
            self._wrong.move_to_end(address)
            while len(self._wrong) > self.max_addresses:
                self._wrong.popitem(last=False)

    def __len__(self) -> int:
        return len(self._wrong)

    def _recent(self, address: str, now: float) -> list[float]:
        times = [t for t in self._wrong.get(address, ()) if t > now - self.window]
        if not times:
            self._wrong.pop(address, None)
        return times
