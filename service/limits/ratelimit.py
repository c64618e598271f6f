"""Fixed one-minute windows of requests and tokens: in the process, or shared in Redis.

A hit checks every counter of a request (account and key, requests and tokens) and counts
it in all of them or in none, atomically: a request refused by one limit uses up nothing.
Window `w` covers `[w * 60, (w + 1) * 60)` seconds of Unix time, the same on every
worker and replica, so counts from all of them add up in one Redis key per window.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from redis.asyncio import Redis

from service.limits.policy import WINDOW_S

# Counters outlive their window by one more, for late token adjustments, then expire.
_TTL_MS = 2 * WINDOW_S * 1000


@dataclass(frozen=True, slots=True)
class Charge:
    counter: str  # e.g. "account:<id>:requests"
    limit: int
    cost: int


@dataclass(frozen=True, slots=True)
class WindowResult:
    window: int
    reset_s: float  # seconds until the window ends
    # After the hit when allowed; as found when refused.
    counts: tuple[int, ...]
    refused: int | None = None  # index of the first charge that did not fit

    @property
    def allowed(self) -> bool:
        return self.refused is None


def window_of(now: float) -> tuple[int, float]:
    window = int(now // WINDOW_S)
    return window, (window + 1) * WINDOW_S - now


class RateLimiter(Protocol):
    async def hit(self, charges: Sequence[Charge], now: float) -> WindowResult: ...

    async def adjust(self, counter: str, window: int, delta: int) -> None:
        """Correct a window's count (tokens estimated at admission, known at the end)."""
        ...

    async def close(self) -> None: ...


class MemoryRateLimiter:
    """Counters of this process only: exact for one worker, per worker for several."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, int], int] = {}
        self._oldest = 0

    def _forget_before(self, window: int) -> None:
        if window - 1 > self._oldest:
            self._oldest = window - 1
            self._counts = {k: v for k, v in self._counts.items() if k[1] >= self._oldest}

    async def hit(self, charges: Sequence[Charge], now: float) -> WindowResult:
        # No await between reading and writing: the event loop makes this atomic.
        window, reset_s = window_of(now)
        self._forget_before(window)
        current = [self._counts.get((c.counter, window), 0) for c in charges]
        for index, (charge, count) in enumerate(zip(charges, current, strict=True)):
            if count + charge.cost > charge.limit:
                return WindowResult(window, reset_s, tuple(current), refused=index)
        for charge in charges:
            self._counts[(charge.counter, window)] = (
                self._counts.get((charge.counter, window), 0) + charge.cost
            )
        counts = tuple(self._counts[(c.counter, window)] for c in charges)
        return WindowResult(window, reset_s, counts)

    async def adjust(self, counter: str, window: int, delta: int) -> None:
        key = (counter, window)
        if key in self._counts:
            self._counts[key] += delta

    async def close(self) -> None:
        return None


# KEYS: one counter per charge (already suffixed with the window).
# ARGV: ttl_ms, then limit and cost of each charge.
# Returns {0, count...} when counted, {index, count...} (counts as found) when refused.
_HIT = """
local ttl = ARGV[1]
local counts = {}
for i = 1, #KEYS do
  counts[i] = tonumber(redis.call('GET', KEYS[i]) or '0')
end
for i = 1, #KEYS do
  if counts[i] + tonumber(ARGV[2 * i + 1]) > tonumber(ARGV[2 * i]) then
    return {i, unpack(counts)}
  end
end
for i = 1, #KEYS do
  counts[i] = redis.call('INCRBY', KEYS[i], ARGV[2 * i + 1])
  redis.call('PEXPIRE', KEYS[i], ttl)
end
return {0, unpack(counts)}
"""

# Only an existing window is corrected: one that expired has nothing left to limit.
_ADJUST = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return redis.call('INCRBY', KEYS[1], ARGV[1])
end
return 0
"""


class RedisRateLimiter:
    """Counters shared by every process using the same Redis and prefix."""

    def __init__(self, redis: Redis, prefix: str) -> None:
        self._redis = redis
        self._prefix = prefix
        self._hit: Any = redis.register_script(_HIT)
        self._adjust: Any = redis.register_script(_ADJUST)

    def _key(self, counter: str, window: int) -> str:
        return f"{self._prefix}rl:{counter}:{window}"

    async def hit(self, charges: Sequence[Charge], now: float) -> WindowResult:
        window, reset_s = window_of(now)
        keys = [self._key(c.counter, window) for c in charges]
        args: list[int] = [_TTL_MS]
        for charge in charges:
            args += [charge.limit, charge.cost]
        reply = await self._hit(keys=keys, args=args)
        refused, *counts = (int(v) for v in reply)
        refused_index = refused - 1 if refused else None
        return WindowResult(window, reset_s, tuple(counts), refused=refused_index)

    async def adjust(self, counter: str, window: int, delta: int) -> None:
        if delta:
            await self._adjust(keys=[self._key(counter, window)], args=[delta])

    async def close(self) -> None:
        return None
