"""Admission and settlement: the two moments the proxy consults the limits of a request.

`admit` runs after authentication and routing, before anything is forwarded: it counts
the request against its per-minute windows and reserves its worst-case cost against its
monthly budgets, or refuses it with a 429. `settle` runs with the request's final ledger
record: the window is corrected to the real tokens and the reservation replaced by the
real cost. If the counter store (Redis) fails, requests are let through and the failure
is logged and counted: the ledger still records every request, and an outage of a
counter must not become an outage of the proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import RedisError
from sqlalchemy.ext.asyncio import AsyncEngine

from service.errors import MeterlineError
from service.ledger.record import LedgerRecord
from service.limits import estimate, repository
from service.limits.budgets import Hold
from service.limits.cache import LimitsCache
from service.limits.counters import Admission, Counters, MemoryCounters, RedisCounters
from service.limits.policy import (
    AppliedLimits,
    KeyLimits,
    Limit,
    applied_limits,
    budget_error,
    duration,
    month_bounds,
    month_of,
    rate_error,
    to_nano_up,
)
from service.limits.ratelimit import Charge, WindowResult
from service.metrics import registry as metrics
from service.prices.cache import PriceCache
from service.proxy.context import ProxyHooks, RequestContext
from service.settings import Settings

log = logging.getLogger("meterline.limits")

_SYNC_TIMEOUT_S = 2.0
# Failures of the counter store are logged at most this often (they come per request).
_LOG_EVERY_S = 10.0
_STORE_RETRY_S = 1.0


@dataclass(frozen=True, slots=True)
class Grant:
    """What an admitted request holds, to be settled when its record is final."""

    reservation: str
    window: int = 0
    token_counters: tuple[str, ...] = ()
    estimated_tokens: int = 0
    budget_counters: tuple[str, ...] = ()
    # x-ratelimit-* headers for the response, as OpenAI sends them.
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Budgeted:
    limit: Limit
    account_id: uuid.UUID
    month: str


def _counter(limit: Limit, what: str) -> str:
    return f"{limit.scope}:{limit.owner}:{what}"


@dataclass(frozen=True, slots=True)
class _Plan:
    """What admission does for one key's limits, worked out once (not per request)."""

    applied: AppliedLimits
    requests: tuple[Charge, ...]  # one request each
    token_counters: tuple[str, ...]

    @classmethod
    def of(cls, applied: AppliedLimits) -> _Plan:
        return cls(
            applied,
            tuple(Charge(_counter(lim, "requests"), lim.limit, 1) for lim in applied.requests),
            tuple(_counter(lim, "tokens") for lim in applied.tokens),
        )


# Distinct limit settings remembered; past it the memo starts over (keys come and go).
_PLANS_MAX = 100_000


def _tightest(charges: Sequence[Charge], counts: Sequence[int]) -> tuple[int, int] | None:
    """(limit, remaining) of the charge with the least left."""
    pairs = [(c.limit, max(c.limit - n, 0)) for c, n in zip(charges, counts, strict=True)]
    return min(pairs, key=lambda pair: pair[1]) if pairs else None


def rate_headers(
    requests: Sequence[Charge], tokens: Sequence[Charge], result: WindowResult
) -> dict[str, str]:
    headers: dict[str, str] = {}
    reset = duration(result.reset_s)
    for kind, charges, counts in (
        ("requests", requests, result.counts[: len(requests)]),
        ("tokens", tokens, result.counts[len(requests) :]),
    ):
        tightest = _tightest(charges, counts)
        if tightest is not None:
            headers[f"x-ratelimit-limit-{kind}"] = str(tightest[0])
            headers[f"x-ratelimit-remaining-{kind}"] = str(tightest[1])
            headers[f"x-ratelimit-reset-{kind}"] = reset
    return headers


class Limits:
    def __init__(
        self,
        settings: Settings,
        engine: AsyncEngine,
        prices: PriceCache,
        counters: Counters,
        redis: Redis | None = None,
    ) -> None:
        self.settings = settings
        self._engine = engine
        self._prices = prices
        self.counters = counters
        self._redis = redis
        self.cache = LimitsCache(engine, settings.key_cache_refresh_s)
        self._plans: dict[KeyLimits, _Plan] = {}
        self._budgeted: dict[str, _Budgeted] = {}
        self._synced: set[str] = set()
        self._syncing: dict[str, asyncio.Task[None]] = {}
        self._task: asyncio.Task[None] | None = None
        self._last_failure_log = 0.0
        self._store_down_until = 0.0

    @classmethod
    def create(cls, settings: Settings, engine: AsyncEngine, prices: PriceCache) -> Limits:
        """Counters in Redis when `redis_url` is set, in this process otherwise."""
        if not settings.redis_url:
            if settings.workers > 1:
                log.warning(
                    "event=limits_per_worker workers=%d detail=set METERLINE_REDIS_URL to "
                    "share rate limits and budgets across workers",
                    settings.workers,
                )
            return cls(settings, engine, prices, MemoryCounters())
        # Short timeouts: a slow Redis must not hold requests; admission then fails open.
        # A bounded pool that waits for a free connection: a burst must queue, not fail.
        pool = BlockingConnectionPool.from_url(
            settings.redis_url,
            max_connections=16,
            timeout=0.5,
            socket_timeout=0.5,
            socket_connect_timeout=0.5,
        )
        redis = Redis(connection_pool=pool)
        return cls(settings, engine, prices, RedisCounters(redis, settings.redis_prefix), redis)

    async def start(self) -> None:
        await self.cache.start()
        self._task = asyncio.create_task(self._resync_forever(), name="budget-resync")

    async def stop(self) -> None:
        await self.cache.stop()
        tasks = [t for t in (self._task, *self._syncing.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        try:
            await self.counters.close()
        except (RedisError, OSError) as exc:
            self._store_failed("settle", exc)
        if self._redis is not None:
            await self._redis.aclose(close_connection_pool=True)

    # -- admission --------------------------------------------------------------------

    async def admit(
        self,
        *,
        key_id: uuid.UUID,
        account_id: uuid.UUID,
        model: str,
        body: dict[str, Any],
        reservation: str | None = None,
        now: datetime | None = None,
    ) -> Grant:
        """Count the request and hold its worst-case cost, or raise a 429."""
        reservation = reservation or uuid.uuid4().hex
        row = await self.cache.get(key_id, account_id)
        plan = self._plans.get(row)
        if plan is None:
            if len(self._plans) >= _PLANS_MAX:
                self._plans.clear()
            plan = self._plans[row] = _Plan.of(applied_limits(self.settings, row))
        applied = plan.applied
        if applied.empty:
            return Grant(reservation)
        now = now or datetime.now(UTC)
        tokens = cost = 0
        if applied.tokens or applied.budgets:
            prompt = estimate.prompt_tokens(body)
            completion = estimate.completion_tokens(
                body, self.settings.budget_default_completion_tokens
            )
            tokens = prompt + completion
            if applied.budgets:
                price = self._prices.book.price_for(model, now)
                cost = to_nano_up(estimate.worst_case_cost(price, prompt, completion))
        if time.monotonic() < self._store_down_until:
            metrics.LIMIT_ERRORS.labels("skipped").inc()
            return Grant(reservation)
        try:
            return await self._admit(plan, reservation, account_id, tokens, cost, now)
        except (RedisError, OSError) as exc:
            self._store_failed("admit", exc)
            return Grant(reservation)

    async def _admit(
        self,
        plan: _Plan,
        reservation: str,
        account_id: uuid.UUID,
        tokens: int,
        cost: int,
        now: datetime,
    ) -> Grant:
        applied = plan.applied
        requests = list(plan.requests)
        by_tokens = [
            Charge(counter, lim.limit, tokens)
            for counter, lim in zip(plan.token_counters, applied.tokens, strict=True)
        ]
        holds: list[Hold] = []
        month = ""
        if applied.budgets:
            month = month_of(now)
            holds = [Hold(_counter(lim, month), lim.limit, cost) for lim in applied.budgets]
            for lim, hold in zip(applied.budgets, holds, strict=True):
                self._budgeted.setdefault(hold.counter, _Budgeted(lim, account_id, month))
            await self._ensure_synced(hold.counter for hold in holds)
        admission = await self.counters.admit(
            requests + by_tokens,
            holds,
            reservation,
            self.settings.budget_reservation_ttl_s,
            now.timestamp(),
        )
        if not admission.allowed:
            raise self._refusal(plan, requests, by_tokens, holds, admission, month)
        return Grant(
            reservation=reservation,
            window=admission.window.window,
            token_counters=tuple(c.counter for c in by_tokens),
            estimated_tokens=tokens,
            budget_counters=tuple(hold.counter for hold in holds),
            headers=rate_headers(requests, by_tokens, admission.window)
            if requests or by_tokens
            else {},
        )

    def _refusal(
        self,
        plan: _Plan,
        requests: list[Charge],
        by_tokens: list[Charge],
        holds: list[Hold],
        admission: Admission,
        month: str,
    ) -> MeterlineError:
        window, budget = admission.window, admission.budget
        if budget.refused is not None:
            metrics.LIMIT_REFUSALS.labels("budget").inc()
            return budget_error(
                plan.applied.budgets[budget.refused],
                budget.spent,
                budget.reserved,
                holds[budget.refused].amount,
                month_bounds(month)[1],
            )
        index = window.refused
        assert index is not None
        kind = "requests" if index < len(requests) else "tokens"
        metrics.LIMIT_REFUSALS.labels(kind).inc()
        charges = requests + by_tokens
        limit = (plan.applied.requests + plan.applied.tokens)[index]
        error = rate_error(kind, limit, window.counts[index], charges[index].cost, window.reset_s)
        error.headers = {
            **rate_headers(requests, by_tokens, window),
            "retry-after": str(max(math.ceil(window.reset_s), 1)),
        }
        return error

    # -- the proxy's hooks (service/proxy/context.py) --------------------------------

    async def admission(self, ctx: RequestContext) -> Grant:
        grant = await self.admit(
            key_id=ctx.key_id,
            account_id=ctx.account_id,
            model=ctx.model,
            body=ctx.body,
            reservation=ctx.request_id,
            now=ctx.occurred_at,
        )
        ctx.response_headers.update(grant.headers)
        return grant

    async def settlement(self, ctx: RequestContext, record: LedgerRecord | None) -> None:
        grant = next((r for r in ctx.reservations if isinstance(r, Grant)), None)
        if grant is None:
            return
        if record is None:  # refused after this admission: nothing was forwarded
            await self.release(grant)
        else:
            await self.settle(grant, record.total_tokens, record.cost_usd)

    def install(self, hooks: ProxyHooks) -> None:
        hooks.admission.append(self.admission)
        hooks.settlement.append(self.settlement)

    # -- settlement -------------------------------------------------------------------

    async def settle(self, grant: Grant, total_tokens: int, cost_usd: Decimal | None) -> None:
        """Replace the estimates of an admitted request by what it really used."""
        if not grant.token_counters and not grant.budget_counters:
            return
        delta = total_tokens - grant.estimated_tokens
        cost = to_nano_up(cost_usd) if cost_usd is not None and cost_usd > 0 else 0
        try:
            await self.counters.settle(
                grant.window,
                [(counter, delta) for counter in grant.token_counters],
                grant.budget_counters,
                grant.reservation,
                cost,
            )
        except (RedisError, OSError) as exc:
            self._store_failed("settle", exc)

    async def release(self, grant: Grant) -> None:
        """An admitted request that produced nothing to bill (refused later, never sent)."""
        await self.settle(grant, 0, None)

    def _store_failed(self, step: str, exc: BaseException) -> None:
        metrics.LIMIT_ERRORS.labels(step).inc()
        now = time.monotonic()
        # A store that failed is left alone for a moment: requests then pass at once
        # instead of each waiting for its own timeout against an unreachable Redis.
        self._store_down_until = now + _STORE_RETRY_S
        if now - self._last_failure_log >= _LOG_EVERY_S:
            self._last_failure_log = now
            log.warning("event=limits_store_failed step=%s error=%s", step, type(exc).__name__)

    # -- spend from the ledger --------------------------------------------------------

    async def _ensure_synced(self, counters: Iterable[str]) -> None:
        """A budget's first use in this process starts from the ledger's sum for the month."""
        missing = [c for c in counters if c not in self._synced]
        if not missing:
            return
        pending = {self._syncing[c] for c in missing if c in self._syncing}
        fresh = [c for c in missing if c not in self._syncing]
        if fresh:
            task = asyncio.create_task(self._sync(fresh), name="budget-sync")
            for counter in fresh:
                self._syncing[counter] = task
            task.add_done_callback(self._synced_done)
            pending.add(task)
        # A database outage must not hold requests: past the timeout the counter is used as
        # it is (asyncio.wait leaves the query running), and the periodic resync catches up.
        await asyncio.wait(pending, timeout=_SYNC_TIMEOUT_S)
        self._synced.update(missing)

    def _synced_done(self, task: asyncio.Task[None]) -> None:
        for counter in [c for c, t in self._syncing.items() if t is task]:
            del self._syncing[counter]

    async def _sync(self, counters: Sequence[str]) -> None:
        budgeted = [self._budgeted[c] for c in counters if c in self._budgeted]
        by_month: dict[str, list[_Budgeted]] = {}
        for item in budgeted:
            by_month.setdefault(item.month, []).append(item)
        try:
            async with self._engine.connect() as connection:
                for month, items in by_month.items():
                    start, end = month_bounds(month)
                    accounts = [b.limit.owner for b in items if b.limit.scope == "account"]
                    keys = [(b.account_id, b.limit.owner) for b in items if b.limit.scope == "key"]
                    spent: dict[uuid.UUID, Decimal] = {}
                    if accounts:
                        spent |= await repository.account_spend(connection, accounts, start, end)
                    if keys:
                        spent |= await repository.key_spend(connection, keys, start, end)
                    for item in items:
                        amount = spent.get(item.limit.owner)
                        if amount is not None and amount > 0:
                            await self.counters.sync(
                                _counter(item.limit, month), to_nano_up(amount)
                            )
        except Exception as exc:  # the database or Redis may be down; the next resync retries
            log.warning("event=budget_sync_failed error=%s", type(exc).__name__)

    async def _resync_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.budget_resync_s)
            current = month_of(datetime.now(UTC))
            for counter, item in list(self._budgeted.items()):
                if item.month != current:  # a past month's counters are no longer used
                    del self._budgeted[counter]
                    self._synced.discard(counter)
            await self._sync(list(self._budgeted))
