"""The response cache's steps on the request path (app/pipeline): lookup, coalesce, store,
stale-if-error, and a stored answer replayed as a stream.

Every answer says what the cache did (``Trace.cache``, sent as ``X-Cache``): HIT (with ``Age``),
MISS, BYPASS (not consulted: caching off for the model, ``Cache-Control: no-cache``, or a
request it cannot compute a key for) or STALE (every provider failed; an answer past its TTL
but within ``stale_ttl`` was served).

Entries are kept per API key (``cache.scope: key``, the default): the key's tenant id is part
of the cache key, so lookups, coalescing and stale answers never cross keys. ``shared`` shares
them across keys, and with them what others asked (docs/security.md).
"""

from __future__ import annotations

import fnmatch
import logging
import re
from dataclasses import dataclass
from functools import partial

from app.cache import Entry, cache_scope, request_key
from app.errors import NoProviderAvailable, UpstreamError
from app.providers import Reply
from app.cache.replay import StreamAssembler, replay_events

log = logging.getLogger("llm_proxy.response_cache")

HIT, MISS, BYPASS, STALE = "HIT", "MISS", "BYPASS", "STALE"
REPLAYABLE = ("chat", "completions")  # whose streams are stored and replayed (app/cache/replay)
_MAX_AGE = re.compile(r"max-age\s*=\s*(\d+)")
# What stale-if-error covers: the providers failed, not the client.
PROVIDER_FAILURES = (UpstreamError, NoProviderAvailable)


@dataclass(frozen=True)
class CachePolicy:
    """What one request lets the cache do."""
    read: bool
    write: bool
    max_age: float | None = None


NO_CACHE = CachePolicy(False, False)


class ResponseCache:
    def __init__(self, entries, coalescer, settings, *, router, timeout: float):
        self.entries = entries  # ByteCache
        self.coalescer = coalescer
        self.settings = settings
        self.router = router
        self.timeout = timeout  # how long an identical request waits for the one in flight
        self._disabled = [re.compile(fnmatch.translate(m)) for m in settings.disabled_models]

    def policy(self, model: str, cache_control: str) -> CachePolicy:
        """From the settings and the request's ``Cache-Control``: no-cache, no-store, max-age=N."""
        if not self.settings.enabled or any(p.match(model) for p in self._disabled):
            return NO_CACHE
        if not cache_control:
            return CachePolicy(True, True)
        directives = cache_control.lower()
        age = _MAX_AGE.search(directives)
        return CachePolicy(read="no-cache" not in directives, write="no-store" not in directives,
                           max_age=float(age.group(1)) if age else None)

    def key(self, call, tenant=None) -> str:
        """The hash of the normalized request, on the model name the provider knows, and of
        the tenant it is kept for: with ``cache.scope: key`` (the default) one API key never
        gets another's answer, nor learns from X-Cache or Age what another asked."""
        model = self.router.canonical_model(call.body["model"])
        return request_key(call.endpoint, {**call.body, "model": model},
                           scope=cache_scope(self.settings.scope, tenant))

    def keeps(self, call) -> bool:
        """Whether the cache may hold answers to ``call``: not a request offering tools unless
        ``cache.tools``; not a stream of a protocol whose streams it cannot replay (the
        Anthropic and Responses front ends: their whole answers are kept)."""
        if call.body.get("tools") and not self.settings.tools:
            return False
        return not call.stream or call.endpoint in REPLAYABLE

    def key_for(self, call, policy: CachePolicy, request) -> str | None:
        """The request's key; None when the policy neither reads nor writes, or when it cannot
        be computed (the request then bypasses the cache: one the cache cannot handle is still
        served)."""
        if not (policy.read or policy.write) or not self.keeps(call):
            return None
        try:
            return self.key(call, request.tenant)
        except Exception as e:  # e.g. orjson refusing a body that parse_body let through
            log.warning("request %s: no cache key (%s: %s); bypassing the cache",
                        request.id, type(e).__name__, e)
            return None

    def lookup(self, key: str, policy: CachePolicy) -> Entry | None:
        """The fresh entry under ``key`` (within the request's max-age), if the policy reads."""
        return self.entries.get(key, policy.max_age) if policy.read else None

    def stale(self, key: str, policy: CachePolicy) -> Entry | None:
        """An entry past its TTL but within ``stale_ttl``, to stand in when every provider
        failed, if the policy reads."""
        return self.entries.get_stale(key) if policy.read else None

    def coalesce(self, key: str, policy: CachePolicy, fetch):
        """(``fetch()``, shared): an identical request in flight shares its answer (shared is
        then True) when the policy reads and coalescing is on."""
        if policy.read and self.settings.coalesce:
            return self.coalescer.run(key, fetch, self.timeout)
        return fetch(), False

    def store(self, key: str, reply: Reply) -> None:
        """Keep a whole answer (a success only)."""
        if reply.status == 200:
            self.entries.set(key, reply.body)

    def replay(self, call, entry: Entry):
        """A stored answer as the SSE events of a stream."""
        include_usage = bool((call.body.get("stream_options") or {}).get("include_usage"))
        return replay_events(call.endpoint, entry.value, include_usage=include_usage)

    def recording(self, call, key: str, relay):
        """``relay``'s events passed through; its answer stored once it ended cleanly."""
        return RecordingStream(relay, StreamAssembler(call.endpoint, relay),
                               partial(self.entries.set, key))


class RecordingStream:
    """Passes a stream's events through, and hands the assembled answer to ``store`` once the
    stream completed cleanly. ``close()`` reaches the stream underneath.

    Recording never breaks the relay: should the assembler or the store raise, the answer is
    just not stored (``StreamAssembler`` is meant never to raise; this is the second guard).
    """

    def __init__(self, relay, assembler, store):
        self._relay = relay
        self._assembler = assembler
        self._store = store

    def __iter__(self):
        return self

    def __next__(self):
        try:
            event = next(self._relay)
        except StopIteration:
            self._record()
            raise
        if self._assembler is not None:
            try:
                self._assembler.feed(event)
            except Exception:
                log.warning("a stream's event broke its recording; it is relayed, not stored",
                            exc_info=True)
                self._assembler = None
        return event

    def _record(self):
        assembler, self._assembler = self._assembler, None
        if assembler is None:
            return
        try:
            body = assembler.result()
            if body is not None:
                self._store(body)
        except Exception:
            log.warning("a stream's answer could not be stored", exc_info=True)

    def close(self):
        self._relay.close()
