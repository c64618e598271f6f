"""Monthly spend counters with reservations, in integer nano-USD: in the process or in Redis.

Each budget (an account's or a key's, for one month) has three parts:

- `spent`: the cost of settled requests, never below the ledger's sum for the month
  (`sync` raises it to that sum; it never lowers it, since the ledger may lag);
- `reserved`: what requests in flight may still cost, each under its reservation id;
- the limit, passed with each call (so a changed budget applies at once).

A reservation fits when `spent + reserved + amount <= limit` and something is left; every
budget of a request is checked and charged together, atomically, or none is.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from redis.asyncio import Redis

# Counters of a month are kept a little longer than the month itself.
_KEEP_MS = 40 * 24 * 3600 * 1000


@dataclass(frozen=True, slots=True)
class Hold:
    counter: str  # e.g. "account:<id>:2026-07"
    limit: int
    amount: int


@dataclass(frozen=True, slots=True)
class HoldResult:
    refused: int | None = None  # index of the first budget that could not cover it
    spent: int = 0  # of the refusing budget
    reserved: int = 0

    @property
    def allowed(self) -> bool:
        return self.refused is None


class BudgetStore(Protocol):
    async def reserve(
        self, holds: Sequence[Hold], reservation: str, ttl_s: float
    ) -> HoldResult: ...

    async def settle(self, counters: Sequence[str], reservation: str, cost: int) -> None:
        """Release the reservation and add the real cost (also when the hold had expired)."""
        ...

    async def sync(self, counter: str, ledger_spent: int) -> None: ...

    async def state(self, counter: str) -> tuple[int, int]:
        """(spent, reserved) now."""
        ...

    async def close(self) -> None: ...


@dataclass
class _Budget:
    spent: int = 0
    holds: dict[str, tuple[int, float]] = field(default_factory=dict)  # id → (amount, deadline)
    reserved: int = 0

    def expire(self, now: float) -> None:
        for rid, (amount, deadline) in list(self.holds.items()):
            if deadline <= now:
                del self.holds[rid]
                self.reserved -= amount


def _fits(limit: int, spent: int, reserved: int, amount: int) -> bool:
    left = limit - spent - reserved
    return left > 0 and amount <= left


class MemoryBudgetStore:
    def __init__(self) -> None:
        self._budgets: dict[str, _Budget] = {}

    def _get(self, counter: str) -> _Budget:
        budget = self._budgets.get(counter)
        if budget is None:
            budget = self._budgets[counter] = _Budget()
        return budget

    async def reserve(self, holds: Sequence[Hold], reservation: str, ttl_s: float) -> HoldResult:
        # No await inside: checked and charged in one step of the event loop.
        now = time.monotonic()
        budgets = [self._get(h.counter) for h in holds]
        for index, (hold, budget) in enumerate(zip(holds, budgets, strict=True)):
            budget.expire(now)
            if not _fits(hold.limit, budget.spent, budget.reserved, hold.amount):
                return HoldResult(index, budget.spent, budget.reserved)
        for hold, budget in zip(holds, budgets, strict=True):
            budget.holds[reservation] = (hold.amount, now + ttl_s)
            budget.reserved += hold.amount
        return HoldResult()

    async def settle(self, counters: Sequence[str], reservation: str, cost: int) -> None:
        for counter in counters:
            budget = self._get(counter)
            held = budget.holds.pop(reservation, None)
            if held is not None:
                budget.reserved -= held[0]
            budget.spent += cost

    async def sync(self, counter: str, ledger_spent: int) -> None:
        budget = self._get(counter)
        budget.spent = max(budget.spent, ledger_spent)

    async def state(self, counter: str) -> tuple[int, int]:
        budget = self._get(counter)
        budget.expire(time.monotonic())
        return budget.spent, budget.reserved

    async def close(self) -> None:
        return None


# Each budget is four keys: spent, reserved total, hash id → amount, zset id → deadline.
# Lua numbers are doubles: exact for integers below 2**53 nano-USD (about 9 million USD a
# month per budget); INCRBY/DECRBY, which do the arithmetic that is stored, use int64.
_EXPIRE_HOLDS = """
local function expire_holds(total, hash, zset, now)
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', zset, '-inf', now)) do
    local amount = redis.call('HGET', hash, id)
    if amount then
      redis.call('DECRBY', total, amount)
      redis.call('HDEL', hash, id)
    end
    redis.call('ZREM', zset, id)
  end
end
"""

# ARGV: now_ms, deadline_ms, keep_ms, reservation id, then limit and amount per budget.
# Returns {0} or {index, spent, reserved} of the first budget that cannot cover it.
_RESERVE = (
    _EXPIRE_HOLDS
    + """
local now, deadline, keep, rid = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local budgets = #KEYS / 4
for b = 0, budgets - 1 do
  expire_holds(KEYS[4 * b + 2], KEYS[4 * b + 3], KEYS[4 * b + 4], now)
  local spent = tonumber(redis.call('GET', KEYS[4 * b + 1]) or '0')
  local reserved = tonumber(redis.call('GET', KEYS[4 * b + 2]) or '0')
  local left = tonumber(ARGV[5 + 2 * b]) - spent - reserved
  if left <= 0 or tonumber(ARGV[6 + 2 * b]) > left then
    return {b + 1, spent, reserved}
  end
end
for b = 0, budgets - 1 do
  local amount = ARGV[6 + 2 * b]
  redis.call('INCRBY', KEYS[4 * b + 2], amount)
  redis.call('HSET', KEYS[4 * b + 3], rid, amount)
  redis.call('ZADD', KEYS[4 * b + 4], deadline, rid)
  for k = 1, 4 do redis.call('PEXPIRE', KEYS[4 * b + k], keep) end
end
return {0}
"""
)

# ARGV: reservation id, cost, keep_ms.
_SETTLE = """
local rid, cost, keep = ARGV[1], ARGV[2], ARGV[3]
for b = 0, #KEYS / 4 - 1 do
  local amount = redis.call('HGET', KEYS[4 * b + 3], rid)
  if amount then
    redis.call('DECRBY', KEYS[4 * b + 2], amount)
    redis.call('HDEL', KEYS[4 * b + 3], rid)
    redis.call('ZREM', KEYS[4 * b + 4], rid)
  end
  redis.call('INCRBY', KEYS[4 * b + 1], cost)
  redis.call('PEXPIRE', KEYS[4 * b + 1], keep)
end
return 0
"""

# Raise `spent` to the ledger's sum, never lower it. ARGV: ledger sum, keep_ms.
_SYNC = """
local spent = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) > spent then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
return 0
"""

_STATE = (
    _EXPIRE_HOLDS
    + """
expire_holds(KEYS[2], KEYS[3], KEYS[4], ARGV[1])
return {tonumber(redis.call('GET', KEYS[1]) or '0'), tonumber(redis.call('GET', KEYS[2]) or '0')}
"""
)


class RedisBudgetStore:
    def __init__(self, redis: Redis, prefix: str) -> None:
        self._redis = redis
        self._prefix = prefix
        self._reserve: Any = redis.register_script(_RESERVE)
        self._settle: Any = redis.register_script(_SETTLE)
        self._sync: Any = redis.register_script(_SYNC)
        self._state: Any = redis.register_script(_STATE)

    def _keys(self, counter: str) -> list[str]:
        base = f"{self._prefix}budget:{counter}"
        return [f"{base}:spent", f"{base}:reserved", f"{base}:holds", f"{base}:deadlines"]

    async def reserve(self, holds: Sequence[Hold], reservation: str, ttl_s: float) -> HoldResult:
        # Wall-clock milliseconds: deadlines must mean the same on every replica.
        now_ms = int(time.time() * 1000)
        keys: list[str] = []
        args: list[int | str] = [now_ms, now_ms + int(ttl_s * 1000), _KEEP_MS, reservation]
        for hold in holds:
            keys += self._keys(hold.counter)
            args += [hold.limit, hold.amount]
        reply = [int(v) for v in await self._reserve(keys=keys, args=args)]
        if reply[0] == 0:
            return HoldResult()
        return HoldResult(reply[0] - 1, reply[1], reply[2])

    async def settle(self, counters: Sequence[str], reservation: str, cost: int) -> None:
        keys = [k for counter in counters for k in self._keys(counter)]
        await self._settle(keys=keys, args=[reservation, cost, _KEEP_MS])

    async def sync(self, counter: str, ledger_spent: int) -> None:
        await self._sync(keys=self._keys(counter)[:1], args=[ledger_spent, _KEEP_MS])

    async def state(self, counter: str) -> tuple[int, int]:
        now_ms = int(time.time() * 1000)
        spent, reserved = await self._state(keys=self._keys(counter), args=[now_ms])
        return int(spent), int(reserved)

    async def close(self) -> None:
        return None
