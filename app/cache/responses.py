"""The response cache on the request path: lookups, coalescing, stores and stale-if-error.

Every answer says what the cache did (``ctx.cache``, sent as ``X-Cache``): HIT (with ``Age``),
MISS, BYPASS (not consulted: caching off for the model, ``Cache-Control: no-cache``, or a
request it cannot compute a key for) or STALE (every provider failed; an answer past its TTL
but within ``stale_ttl`` was served).
"""

from __future__ import annotations

import fnmatch
import logging
import re
from dataclasses import dataclass

from app.cache import request_key
from app.errors import NoProviderAvailable, UpstreamError
from app.providers import Reply
from app.cache.replay import StreamAssembler, replay_events

log = logging.getLogger("llm_proxy.response_cache")

HIT, MISS, BYPASS, STALE = "HIT", "MISS", "BYPASS", "STALE"
_MAX_AGE = re.compile(r"max-age\s*=\s*(\d+)")
# What stale-if-error covers: the providers failed, not the client.
_PROVIDER_FAILURES = (UpstreamError, NoProviderAvailable)


@dataclass(frozen=True)
class CachePolicy:
    """What one request lets the cache do."""
    read: bool
    write: bool
    max_age: float | None = None


NO_CACHE = CachePolicy(False, False)


class ResponseCache:
    def __init__(self, store, coalescer, settings, *, router, timeout: float, clock):
        self.store = store  # ByteCache
        self.coalescer = coalescer
        self.settings = settings
        self.router = router
        self.timeout = timeout  # how long an identical request waits for the one in flight
        self.clock = clock
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

    def key(self, call) -> str:
        """The hash of the normalized request, on the model name the provider knows."""
        model = self.router.canonical_model(call.body["model"])
        return request_key(call.endpoint, {**call.body, "model": model})

    def complete(self, call, ctx, policy: CachePolicy, fetch) -> Reply:
        """A whole answer: from the cache, from an identical request in flight, or ``fetch()``."""
        key = self._key(call, ctx) if policy.read or policy.write else None
        if key is None:
            ctx.cache = BYPASS
            return fetch()
        if policy.read and self._hit(key, policy, ctx):
            return Reply(ctx.cached.value)
        ctx.cache = MISS if policy.read else BYPASS

        def fetch_and_store():
            reply = fetch()
            if policy.write and reply.status == 200:
                self.store.set(key, reply.body)
            return reply, ctx.provider

        try:
            if policy.read and self.settings.coalesce:
                (reply, provider), shared = self.coalescer.run(key, fetch_and_store, self.timeout)
                if shared:
                    ctx.cache, ctx.cache_age, ctx.provider, ctx.coalesced = HIT, 0.0, provider, True
                return reply
            return fetch_and_store()[0]
        except _PROVIDER_FAILURES:
            if not self._stale(key, policy, ctx):
                raise
            return Reply(ctx.cached.value)

    def stream(self, call, ctx, policy: CachePolicy, open_stream):
        """SSE events: a cached answer replayed, or the live stream (stored once it completes)."""
        include_usage = bool((call.body.get("stream_options") or {}).get("include_usage"))
        key = self._key(call, ctx) if policy.read or policy.write else None
        if key is None:
            ctx.cache = BYPASS
            return open_stream()
        if policy.read and self._hit(key, policy, ctx):
            return replay_events(call.endpoint, ctx.cached.value, include_usage=include_usage)
        ctx.cache = MISS if policy.read else BYPASS
        try:
            relay = open_stream()
        except _PROVIDER_FAILURES:
            if not self._stale(key, policy, ctx):
                raise
            return replay_events(call.endpoint, ctx.cached.value, include_usage=include_usage)
        if not policy.write:
            return relay
        return RecordingStream(relay, StreamAssembler(call.endpoint),
                               lambda body: self.store.set(key, body))

    def _key(self, call, ctx) -> str | None:
        """The request's key, or None when it cannot be computed (the request then bypasses
        the cache): a request the cache cannot handle is still served."""
        try:
            return self.key(call)
        except Exception as e:  # e.g. orjson refusing a body that parse_body let through
            log.warning("request %s: no cache key (%s: %s); bypassing the cache",
                        ctx.request_id, type(e).__name__, e)
            return None

    def _hit(self, key, policy, ctx) -> bool:
        entry = self.store.get(key, policy.max_age)
        if entry is None:
            return False
        ctx.cache, ctx.cache_age, ctx.cached = HIT, entry.age(self.clock()), entry
        return True

    def _stale(self, key, policy, ctx) -> bool:
        entry = self.store.get_stale(key) if policy.read else None
        if entry is None:
            return False
        ctx.cache, ctx.cache_age, ctx.cached = STALE, entry.age(self.clock()), entry
        return True


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
