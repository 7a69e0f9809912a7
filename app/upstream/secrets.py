"""What no client may read and no log may quote: every key the proxy knows, scrubbed from
upstream text.

An upstream can echo what it was sent (a gateway that quotes the failed request's headers, a
test server, a misconfigured provider that shares a host with another), so every configured
secret is looked for in everything read from an upstream: each provider's key (any upstream may
be the one that knows another's), the admin key, the plain client keys of ``PROXY_API_KEYS``,
and the key the requesting client presented. Each is replaced by ``[redacted]`` in whole
answers, error bodies and stream events as they are read (``app/upstream``), so the cache, the
error messages built from upstream text, the logs quoting them and the client all get the
scrubbed bytes.

The cost on the hot path is one substring search per secret over the answer (C speed, about a
microsecond per secret for a 2 KB answer, tenths for an SSE event): a short tuple built once at
start-up, plus the client's key when it is not already one of them. A regular expression over
all of them was measured slower (it stops at every possible first character). Secrets shorter
than ``MIN_LENGTH`` are left alone: they would match ordinary text.

JSON lets a writer escape any character (``\\u0073k-...``, ``\\/``), so a secret written that
way is found too: only when the data holds such an escape at all is it read with printable
ASCII escapes written out (the JSON means the same), and scrubbed in that form.
"""

from __future__ import annotations

import re

import orjson

from settings import parse_env_keys

MIN_LENGTH = 8
KEYS_KEPT = 256  # scrubbers kept for presented keys not configured in plain (see ``for_key``)
REDACTED = "[redacted]"
_REDACTED = REDACTED.encode()
# A JSON escape of a printable ASCII character (but the quote and the backslash, which must stay
# escaped), or an escaped backslash, which is kept whole so the next escape is read rightly.
_ESCAPES = re.compile(rb'\\\\|\\u00([2-7][0-9a-fA-F])|\\/')
_MAY_HIDE = re.compile(rb"\\(?:u00[2-7]|/)")  # one of those escapes (looked for only after a
# backslash was found at all: one memchr for the answers that have none)
_KEEP_ESCAPED = frozenset((0x22, 0x5C, 0x7F))


class Secrets:
    """The configured secrets, ready to scrub; ``for_key`` adds the requesting client's key."""

    def __init__(self, values=()):
        self._known = frozenset(v for v in values if v and len(v) >= MIN_LENGTH)
        self.scrubber = Scrubber(self._known)
        self._by_key: dict[str, Scrubber] = {}

    @classmethod
    def from_settings(cls, settings) -> Secrets:
        """Every provider's key, the admin key and the plain client keys of the settings."""
        values = [p.api_key for p in settings.providers]
        values.append(settings.admin_api_key)
        values += [key for _, key in parse_env_keys(settings.auth.env_keys or "")]
        return cls(values)

    def for_key(self, key: str) -> Scrubber:
        """The scrubber for a request whose client presented ``key`` ("" for none): the shared
        one when the key adds nothing (none, short, or configured already). Keys known only by
        their SHA-256 (``auth.api_keys``) come back on every request: their scrubbers are kept,
        at most ``KEYS_KEPT`` (then the lot is dropped: keys sent without keys checked are
        any string a client likes)."""
        if not key or len(key) < MIN_LENGTH or key in self._known:
            return self.scrubber
        scrubber = self._by_key.get(key)
        if scrubber is None:
            if len(self._by_key) >= KEYS_KEPT:
                self._by_key = {}  # one reference swap: concurrent readers never see it half done
            scrubber = self._by_key[key] = Scrubber(self._known | {key})
        return scrubber


class Scrubber:
    """Replaces a fixed set of secrets with ``[redacted]`` in bytes (``scrub``) and text
    (``text``)."""

    __slots__ = ("_needles", "_texts")

    def __init__(self, values):
        # Longest first: a secret that contains a shorter one goes whole, not around it.
        texts = sorted(set(values), key=len, reverse=True)
        needles = set()
        for value in texts:
            for form in (_raw, _json_escaped):
                try:
                    needles.add(form(value))
                except (UnicodeEncodeError, orjson.JSONEncodeError):
                    pass  # a lone surrogate: no upstream can send it in that form
        self._needles = tuple(sorted(needles, key=len, reverse=True))
        self._texts = tuple(texts)

    def scrub(self, data: bytes) -> bytes:
        """``data`` with every secret replaced by ``[redacted]``, also where JSON escapes hid
        it."""
        size = len(data)
        for needle in self._needles:
            if len(needle) <= size and needle in data:
                data = data.replace(needle, _REDACTED)
        if self._needles and b"\\" in data and _MAY_HIDE.search(data):
            plain = _ESCAPES.sub(_unescape, data)
            if plain != data:
                scrubbed = self.scrub(plain)
                if scrubbed != plain:
                    return scrubbed
        return data

    def text(self, value: str) -> str:
        """``value`` (text an upstream sent, decoded) with every secret replaced."""
        for secret in self._texts:
            if secret in value:
                value = value.replace(secret, REDACTED)
        return value


def _raw(value: str) -> bytes:
    return value.encode("utf-8", "surrogateescape")  # as the key store reads a presented key


def _json_escaped(value: str) -> bytes:
    return orjson.dumps(value)[1:-1]  # as JSON writes it: \" \\ and control characters


def _unescape(match: re.Match) -> bytes:
    escaped = match.group(0)
    if escaped == b"\\/":
        return b"/"
    code = match.group(1)
    if code is None:
        return escaped  # an escaped backslash stays as it is
    char = int(code, 16)
    return escaped if char in _KEEP_ESCAPED else bytes((char,))
