"""The counters in Redis: shared by every worker and replica using the same Redis and prefix.

Imported only when `METERLINE_REDIS_URL` is set: the client costs a worker 5.8 MB it would
otherwise carry for nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import RedisError

from service.limits.budgets import Hold, HoldResult
from service.limits.counters import Admission
from service.limits.ratelimit import Charge, WindowResult, window_of
from service.metrics import registry as metrics

log = logging.getLogger("meterline.limits")

# Settlements wait at most this long, or until this many are waiting, to go to Redis.
_SETTLE_DELAY_S = 0.02
_SETTLE_BATCH = 256
# A batch that failed is sent again after this pause, at most this many times in a row.
_SETTLE_RETRY_S = 0.5
_SETTLE_ATTEMPTS = 3
# Window counters outlive their minute by one more, for late token corrections.
_WINDOW_TTL_MS = 120_000
# Budget counters of a month are kept a little longer than the month itself.
_KEEP_MS = 40 * 24 * 3600 * 1000

# Lua numbers are doubles: exact for integers below 2**53 (for budgets, about 9 million USD
# a month in nano-USD); INCRBY/DECRBY, which do the arithmetic that is stored, use int64.
# A budget is five keys: spent, reserved (total), holds (hash id → amount), deadlines
# (zset), and the mark that `spent` was synced from the ledger (gone after Redis lost its
# data: the budget then refuses until it is synced again).
_BUDGET_KEYS = ("spent", "reserved", "holds", "deadlines", "synced")
_LIBRARY = """
local function expire_holds(b, now)
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', b[4], '-inf', now)) do
    local amount = redis.call('HGET', b[3], id)
    if amount then
      redis.call('DECRBY', b[2], amount)
      redis.call('HDEL', b[3], id)
    end
    redis.call('ZREM', b[4], id)
  end
end

local function budget_keys(first, count)
  local budgets = {}
  for i = 0, count - 1 do
    local k = first + 5 * i
    budgets[i + 1] = {KEYS[k], KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4]}
  end
  return budgets
end

local function release(b, rid)
  local amount = redis.call('HGET', b[3], rid)
  if amount then
    redis.call('DECRBY', b[2], amount)
    redis.call('HDEL', b[3], rid)
    redis.call('ZREM', b[4], rid)
  end
end
"""

# KEYS: n window counters, then five keys per budget.
# ARGV: n, window ttl_ms, now_ms, deadline_ms, keep_ms, reservation id, then limit and
# cost per window, then limit, amount and minimum per budget.
# Returns {0, 0, 0, 0, granted, counts…} when admitted (counts after it), {1, i, 0, 0, 0,
# counts…} when window i refused it, {2, b, spent, reserved, 0, counts…} when budget b did,
# {3, b, 0, 0, 0, counts…} when budget b was never synced from the ledger.
_ADMIT = (
    _LIBRARY
    + """
local n = tonumber(ARGV[1])
local ttl, now, deadline, keep, rid = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local budgets = budget_keys(n + 1, (#KEYS - n) / 5)
local counts = {}
for i = 1, n do
  counts[i] = tonumber(redis.call('GET', KEYS[i]) or '0')
end
for i = 1, n do
  if counts[i] + tonumber(ARGV[6 + 2 * i]) > tonumber(ARGV[5 + 2 * i]) then
    return {1, i, 0, 0, 0, unpack(counts)}
  end
end
for b, keys in ipairs(budgets) do
  if redis.call('EXISTS', keys[5]) == 0 then
    return {3, b, 0, 0, 0, unpack(counts)}
  end
end
local first = 6 + 2 * n
local granted = nil
for b, keys in ipairs(budgets) do
  expire_holds(keys, now)
  local spent = tonumber(redis.call('GET', keys[1]) or '0')
  local reserved = tonumber(redis.call('GET', keys[2]) or '0')
  local left = tonumber(ARGV[first + 3 * b - 2]) - spent - reserved
  local amount = tonumber(ARGV[first + 3 * b - 1])
  if left <= 0 or tonumber(ARGV[first + 3 * b]) > left then
    return {2, b, spent, reserved, 0, unpack(counts)}
  end
  local fits = math.min(amount, left)
  if granted == nil or fits < granted then granted = fits end
end
for i = 1, n do
  counts[i] = redis.call('INCRBY', KEYS[i], ARGV[6 + 2 * i])
  redis.call('PEXPIRE', KEYS[i], ttl)
end
granted = granted or 0
for b, keys in ipairs(budgets) do
  redis.call('INCRBY', keys[2], granted)
  redis.call('HSET', keys[3], rid, granted)
  redis.call('ZADD', keys[4], deadline, rid)
  for k = 1, 4 do redis.call('PEXPIRE', keys[k], keep) end
end
return {0, 0, 0, 0, granted, unpack(counts)}
"""
)

# KEYS: n window counters to correct, then five keys per budget.
# ARGV: n, reservation id, cost, keep_ms, then the delta of each window counter.
# A window that expired is not corrected: it has nothing left to limit.
_SETTLE = (
    _LIBRARY
    + """
local n = tonumber(ARGV[1])
local rid, cost, keep = ARGV[2], ARGV[3], ARGV[4]
for i = 1, n do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    redis.call('INCRBY', KEYS[i], ARGV[4 + i])
  end
end
for _, keys in ipairs(budget_keys(n + 1, (#KEYS - n) / 5)) do
  release(keys, rid)
  redis.call('INCRBY', keys[1], cost)
  redis.call('PEXPIRE', keys[1], keep)
end
return 0
"""
)

# KEYS: spent, synced. ARGV: the ledger's sum, keep_ms.
_SYNC = """
local spent = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) > spent then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
redis.call('SET', KEYS[2], '1', 'PX', ARGV[2])
return 0
"""

# KEYS: one budget. ARGV: now_ms.
_STATE = (
    _LIBRARY
    + """
local keys = budget_keys(1, 1)[1]
expire_holds(keys, ARGV[1])
return {tonumber(redis.call('GET', keys[1]) or '0'), tonumber(redis.call('GET', keys[2]) or '0')}
"""
)


class _Pipeliner:
    """Sends the scripts called during one turn of the event loop in one pipelined round trip.

    Under load many requests are admitted in the same turn; a round trip of the client
    costs far more CPU than one more command in it, so they share one. Each script is
    still atomic, and the pipeline runs them in the order they were called.
    """

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._queue: list[tuple[Any, list[str], list[int | str], asyncio.Future[Any]]] = []
        self._scheduled = False
        self._running: set[asyncio.Task[None]] = set()

    async def call(self, script: Any, keys: list[str], args: list[int | str]) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append((script, keys, args, future))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._send)
        return await future

    def _send(self) -> None:
        self._scheduled = False
        batch, self._queue = self._queue, []
        task = asyncio.create_task(self._execute(batch))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _execute(
        self, batch: list[tuple[Any, list[str], list[int | str], asyncio.Future[Any]]]
    ) -> None:
        try:
            if len(batch) == 1:  # a pipeline of one costs more than the plain call
                script, keys, args, _ = batch[0]
                results = [await script(keys=keys, args=args)]
            else:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for script, keys, args, _ in batch:
                        await script(keys=keys, args=args, client=pipe)
                    results = await pipe.execute(raise_on_error=False)
        except BaseException as exc:
            for *_, future in batch:
                if not future.done():
                    future.set_exception(
                        exc if isinstance(exc, Exception) else RedisError("cancelled")
                    )
            if not isinstance(exc, Exception):
                raise
            return
        for (*_, future), result in zip(batch, results, strict=True):
            if future.done():  # its request went away meanwhile
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)


def connect(redis_url: str, prefix: str) -> tuple[Redis, RedisCounters]:
    """The client (closed by whoever holds it) and the counters on it."""
    # A Redis that refuses connections fails at once (rate limits then pass, budgets
    # refuse). A connection and an answer are waited for as long as a free connection
    # is: under a burst, a worker opens its pool's connections while its loop is busy
    # and reads answers late, and taking that for an outage let rate-limited requests
    # through past their limit.
    # A bounded pool that waits for a free connection: a burst must queue, not fail.
    pool = BlockingConnectionPool.from_url(
        redis_url,
        max_connections=16,
        timeout=2.0,  # waiting for a free connection: a burst queues (budgets refuse past it)
        socket_timeout=2.0,
        socket_connect_timeout=2.0,
    )
    redis = Redis(connection_pool=pool)
    return redis, RedisCounters(redis, prefix)


class RedisCounters:
    """Counters shared by every process using the same Redis and key prefix.

    Settlements are sent in batches, a few milliseconds late, in one pipelined round trip:
    admission needs its answer before the request goes on, settlement does not (until it
    lands, a request's reservation simply holds a little longer).
    """

    # What a failing Redis raises (what `Limits` then does: `Counters.failures`).
    failures: tuple[type[Exception], ...] = (RedisError, OSError)

    def __init__(self, redis: Redis, prefix: str) -> None:
        self._redis = redis
        self._prefix = prefix
        self._pipeliner = _Pipeliner(redis)
        self._pending: list[tuple[list[str], list[int | str]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._closing = False
        self._last_failure_log = 0.0
        self._admit: Any = redis.register_script(_ADMIT)
        self._settle: Any = redis.register_script(_SETTLE)
        self._sync: Any = redis.register_script(_SYNC)
        self._state: Any = redis.register_script(_STATE)

    def _window_key(self, counter: str, window: int) -> str:
        return f"{self._prefix}rl:{counter}:{window}"

    def _budget_keys(self, budget: str) -> list[str]:
        base = f"{self._prefix}budget:{budget}"
        return [f"{base}:{part}" for part in _BUDGET_KEYS]

    async def admit(
        self,
        charges: Sequence[Charge],
        holds: Sequence[Hold],
        reservation: str,
        ttl_s: float,
        now: float,
    ) -> Admission:
        window, reset_s = window_of(now)
        # Wall-clock milliseconds: a deadline must mean the same on every replica.
        now_ms = int(now * 1000)
        keys = [self._window_key(c.counter, window) for c in charges]
        args: list[int | str] = [
            len(charges),
            _WINDOW_TTL_MS,
            now_ms,
            now_ms + int(ttl_s * 1000),
            _KEEP_MS,
            reservation,
        ]
        for charge in charges:
            args += [charge.limit, charge.cost]
        for hold in holds:
            keys += self._budget_keys(hold.counter)
            args += [hold.limit, hold.amount, hold.least]
        status, index, spent, reserved, granted, *counts = (
            int(v) for v in await self._pipeliner.call(self._admit, keys, args)
        )
        windows = WindowResult(
            window, reset_s, tuple(counts), refused=index - 1 if status == 1 else None
        )
        if status == 2:
            return Admission(windows, HoldResult(index - 1, spent, reserved))
        if status == 3:
            return Admission(windows, HoldResult(index - 1, unsynced=True))
        return Admission(windows, HoldResult(granted=granted))

    async def settle(
        self,
        window: int,
        corrections: Sequence[tuple[str, int]],
        budgets: Sequence[str],
        reservation: str,
        cost: int,
    ) -> None:
        corrections = [(c, d) for c, d in corrections if d]
        if not corrections and not budgets:
            return
        keys = [self._window_key(counter, window) for counter, _ in corrections]
        keys += [k for budget in budgets for k in self._budget_keys(budget)]
        args: list[int | str] = [len(corrections), reservation, cost, _KEEP_MS]
        args += [delta for _, delta in corrections]
        self._pending.append((keys, args))
        if len(self._pending) >= _SETTLE_BATCH:
            await self.flush()
        else:
            self._ensure_flusher()

    def _ensure_flusher(self) -> None:
        if not self._closing and (self._flusher is None or self._flusher.done()):
            self._flusher = asyncio.create_task(self._flush_soon(), name="limits-settle")

    async def _flush_soon(self) -> None:
        """Send settlements until none is waiting.

        A settlement that arrives while a batch is on its way to Redis goes with the next
        batch, a few milliseconds later: it must not wait (holding its reservation) for
        whichever request happens to settle next. A batch that fails is sent again after a
        pause; after `_SETTLE_ATTEMPTS` failures in a row what waits is dropped (counted):
        the reservations then expire by their deadline and the ledger resync restores the
        spend.
        """
        failures = 0
        while self._pending:
            await asyncio.sleep(_SETTLE_RETRY_S if failures else _SETTLE_DELAY_S)
            try:
                await self.flush()
                failures = 0
            except self.failures as exc:
                failures += 1
                metrics.LIMIT_ERRORS.labels("settle").inc()
                now = time.monotonic()
                if now - self._last_failure_log >= 10:
                    self._last_failure_log = now
                    log.warning(
                        "event=limits_settle_failed error=%s waiting=%d",
                        type(exc).__name__,
                        len(self._pending),
                    )
                if failures >= _SETTLE_ATTEMPTS:
                    self._pending = []

    async def flush(self) -> None:
        batch, self._pending = self._pending, []
        if not batch:
            return
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for keys, args in batch:
                    await self._settle(keys=keys, args=args, client=pipe)
                await pipe.execute()
        except BaseException:
            # Usually nothing reached Redis (it is down or the connection could not be
            # had): the flusher sends the batch again. Should a part have been applied, a
            # cost counted twice only makes the budget stricter for the rest of the month.
            self._pending[:0] = batch
            self._ensure_flusher()
            raise

    async def close(self) -> None:
        """Send what is still waiting (graceful shutdown)."""
        self._closing = True
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        await self.flush()

    async def sync(self, budget: str, ledger_spent: int) -> None:
        spent, *_, synced = self._budget_keys(budget)
        await self._sync(keys=[spent, synced], args=[ledger_spent, _KEEP_MS])

    async def state(self, budget: str) -> tuple[int, int]:
        await self.flush()
        spent, reserved = await self._state(
            keys=self._budget_keys(budget), args=[int(time.time() * 1000)]
        )
        return int(spent), int(reserved)
