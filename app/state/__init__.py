"""What several proxy processes share through Redis (``REDIS_URL``), with the local stores
that serve while Redis is away: the two caches, the rate-limit buckets and breaker state."""

from __future__ import annotations

import time

from app.cache import CacheSet
from app.pipeline.limits import MemoryLimitStore
from app.state.breakers import redis_breaker_storage
from app.state.limits import RedisLimitStore
from app.state.store import RedisByteCache, connect


class SharedState:
    """The Redis client, its guard, and the shared stores built on it."""

    def __init__(self, settings, *, clock=time.monotonic):
        r = settings.redis
        self.prefix = r.prefix
        self.client, self.guard = connect(
            r.url, pool_size=settings.server.threads, clock=clock, timeout=r.timeout,
            failure_threshold=r.failure_threshold, recovery_timeout=r.recovery_timeout)
        # A slot lease outlives any request, so a crashed process's slots come back.
        self._lease = max(600.0, 2 * settings.http_client.deadline)
        self._clock = clock

    def breaker_storage(self, name):
        """pybreaker storage for one provider's breaker, namespaced, falling back in memory."""
        return redis_breaker_storage(self.client, name, self.prefix, guard=self.guard,
                                     clock=self._clock)

    def caches(self, local: CacheSet, cache_settings, *, clock=time.monotonic) -> CacheSet:
        """The response and summary caches in Redis, each over its local fallback; entries come
        back with ``stored_at`` in ``clock`` units, like the local ones."""
        c = cache_settings

        def shared(name, local_cache, ttl):
            return RedisByteCache(name, self.guard, local_cache, ttl=ttl, stale_ttl=c.stale_ttl,
                                  max_bytes=local_cache.max_bytes, prefix=self.prefix,
                                  clock=time.time, local_clock=clock)
        return CacheSet(shared("response", local.response, c.response_cache_ttl),
                        shared("summary", local.summary, c.summary_cache_ttl))

    def limit_store(self) -> RedisLimitStore:
        """Rate-limit buckets exact across processes (callers must pass wall-clock time)."""
        return RedisLimitStore(self.guard, MemoryLimitStore(sweep_interval=60.0), self.prefix,
                               lease=self._lease)

    def stats(self) -> dict:
        return self.guard.stats()

    def close(self):
        self.client.close()
