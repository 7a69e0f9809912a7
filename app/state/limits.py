"""Rate-limit buckets in Redis for several proxy processes: one Lua script per decision, so
limits are exact across processes; the in-process store answers while Redis is away."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from typing import Callable

from redis.exceptions import NoScriptError

from app.pipeline.limits import MICROSECONDS, MemoryLimitStore, Take
from app.state.store import LOCAL, PREFIX, RedisGuard, locally

# One decision, atomically: the bucket refilled to `t`, `cost` units spent if `need` are there
# (need < 0: always; a negative cost gives units back, never past full: a token reservation
# settled), written back with an expiry at the time it would be full (no key = full). A token
# reservation is need = cost = the tokens reserved: checked and taken in this one script, so
# processes cannot all reserve the same last tokens, and a refusal takes nothing.
# Integer arithmetic exactly as MemoryLimitStore.take. Lua numbers are doubles: every value
# stays an integer below 2^53 (time in µs ~1.7e15; credit ~ burst * window_µs), ceil_div
# corrects the float quotient, and integers are written with %.0f (tostring keeps 14 digits).
_TAKE = """
local function ceil_div(a, b)
  local q = math.floor(a / b)
  if q * b < a then q = q + 1 elseif (q - 1) * b >= a then q = q - 1 end
  return q
end
local limit, unit, full = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local t, cost, need = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local credit, updated = full, t
local raw = redis.call('GET', KEYS[1])
if raw then
  local sep = string.find(raw, ' ', 1, true)
  credit = tonumber(string.sub(raw, 1, sep - 1))
  updated = tonumber(string.sub(raw, sep + 1))
end
if t > updated then
  local gap = full - credit
  if gap <= 0 or t - updated >= ceil_div(gap, limit) then
    credit = full
  else
    credit = credit + (t - updated) * limit
  end
  updated = t
end
local allowed = need < 0 or credit >= need * unit
if allowed then credit = math.min(full, credit - cost * unit) end
local reset_us = ceil_div(full - credit, limit)
if reset_us > 0 then
  redis.call('SET', KEYS[1], string.format('%.0f %.0f', credit, updated),
             'PX', string.format('%.0f', ceil_div(reset_us, 1000)))
else
  redis.call('DEL', KEYS[1])
end
local retry_us = 0
if not allowed then retry_us = ceil_div(need * unit - credit, limit) end
return {allowed and 1 or 0, string.format('%.0f', credit), retry_us, reset_us}
"""

# One in-flight slot: leases in a sorted set scored by expiry (ms of the store's clock).
# Expired leases (a crashed process's slots) are dropped first; the key expires with the last.
_ENTER = """
local now, limit, lease = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
local held = redis.call('ZCARD', KEYS[1])
if held >= limit then return {0, held} end
redis.call('ZADD', KEYS[1], string.format('%.0f', now + lease), ARGV[4])
redis.call('PEXPIRE', KEYS[1], lease)
return {1, held + 1}
"""


class _Script:
    """A Lua script run with EVALSHA, and with EVAL when Redis does not have it (NOSCRIPT)."""

    def __init__(self, source: str):
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    def __call__(self, client, keys, args):
        try:
            return client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return client.eval(self.source, len(keys), *keys, *args)  # caches it in Redis too


class RedisLimitStore:
    """A ``LimitStore`` in Redis: every process's decisions on one bucket per key, exactly.

    ``take`` is one Lua script per decision (read, refill, decide, write: atomic in Redis), with
    ``MemoryLimitStore``'s token-bucket arithmetic, so across processes no two requests spend the
    same unit. The bucket key expires when the bucket would be full again. Time is the caller's
    ``now`` (``RateLimiter``'s clock; give it ``time.time``): tests can inject a clock, and the
    cost is that machines' clock skew moves refills by as much (NTP keeps it to milliseconds; a
    caller whose clock is behind the bucket's last update refills nothing until it catches up,
    so skew never mints units). Redis ``TIME`` would remove the skew but not the injection.

    In-flight slots are leases in a sorted set: ``enter`` drops expired leases and adds one
    (expiring after ``lease`` seconds of ``clock``, longer than the longest request), ``leave``
    removes one this process holds (never below zero), so a crashed process's slots come back
    after ``lease``. While Redis is unavailable every call goes to ``local``; a slot taken
    locally is given back locally.
    """

    def __init__(self, guard: RedisGuard, local: MemoryLimitStore | None = None,
                 prefix: str = PREFIX, *, lease: float = 600.0,
                 clock: Callable[[], float] = time.time):
        self.guard = guard
        self.local = local if local is not None else MemoryLimitStore()
        self.prefix = f"{prefix}limit:"
        self.lease_ms = max(1, int(lease * 1000))
        self._clock = clock
        self._take = _Script(_TAKE)
        self._enter = _Script(_ENTER)
        self._lock = threading.Lock()
        self._held: dict[str, list[str | None]] = {}  # key -> lease members (None: local slot)
        self._serial = 0
        self._owner = f"{os.getpid()}:{id(self):x}"

    def take(self, key, *, limit, window, burst, cost, need, now) -> Take:
        unit = round(window * MICROSECONDS)
        full = burst * unit
        t = round(now * MICROSECONDS)
        args = (limit, unit, full, t, cost, -1 if need is None else need)
        out = self.guard.run(lambda c: self._take(c, [self.prefix + key], args), locally)
        if out is LOCAL:
            return self.local.take(key, limit=limit, window=window, burst=burst, cost=cost,
                                   need=need, now=now)
        allowed, credit, retry_us, reset_us = int(out[0]), int(out[1]), int(out[2]), int(out[3])
        return Take(bool(allowed), credit / unit, retry_us / MICROSECONDS, reset_us / MICROSECONDS)

    def enter(self, key, limit) -> tuple[bool, int]:
        with self._lock:
            self._serial += 1
            member = f"{self._owner}:{self._serial}"
        now_ms = int(self._clock() * 1000)
        args = (now_ms, limit, self.lease_ms, member)
        out = self.guard.run(
            lambda c: self._enter(c, [f"{self.prefix}{key}"], args), locally)
        if out is LOCAL:
            allowed, held = self.local.enter(key, limit)
            member = None
        else:
            allowed, held = bool(int(out[0])), int(out[1])
        if allowed:
            with self._lock:
                self._held.setdefault(key, []).append(member)
        return allowed, held

    def leave(self, key) -> None:
        with self._lock:
            members = self._held.get(key)
            if not members:
                return  # nothing held here: never below zero
            member = members.pop()
            if not members:
                del self._held[key]
        if member is None:
            self.local.leave(key)
        else:  # if Redis is down now, the lease expires on its own
            self.guard.run(lambda c: c.zrem(f"{self.prefix}{key}", member), locally)

    def __len__(self) -> int:
        return len(self.local)


# -- circuit breakers ------------------------------------------------------------------------
