"""Admission and settlement: the two moments the proxy consults the limits of a request.

`admit` runs after authentication and routing, before anything is forwarded: it counts
the request against its per-minute windows and reserves its worst-case cost against its
monthly budgets, or refuses it with a 429. `settle` runs with the request's final ledger
record: the window is corrected to the real tokens and the reservation replaced by the
real cost. If the counter store (Redis) fails, requests are let through and the failure
is logged and counted: the ledger still records every request, and an outage of a
counter must not become an outage of the proxy.

A budget is hard: a request reserves the most it may cost; one that sets no completion
limit is granted what the budget has left (up to the default completion budget) and its
upstream `max_tokens` is capped to what that pays for; a stream that generates past its
reservation is cut by the proxy. A budget whose spend was never read from the ledger (a
new process or month, a Redis that came back empty) is synced before it admits anything;
while the ledger cannot be read, its requests are refused with a 503 rather than admitted
against a counter at 0. Requests on an open quoted task reserve nothing: the task's fixed
price was reserved when its quote was accepted.

A prepaid account's credit is one more budget of the same kind, its counter
`credits:<account>`: `spent` is everything its requests have cost since its first grant
(synced from the ledger, raised by each settlement), and its limit is what the ledger says
was spent plus what the active grants still hold (`_credit_limit`), so a request fits when
its worst case fits in the credit left after what is in flight. The limit is recomputed at
every admission from the account's credit as last read from the ledger: a grant that has
expired since stops counting at once, and a change of the grants (any process, through
NOTIFY) makes the next admission read the ledger again. When it does not fit: 402.

The webhook events `budget.threshold`, `credits.low` and `credits.depleted` are noticed off
the hot path: a settlement only notes the counter it charged, and a job looks at the noted
counters each second (a prepaid balance is that same limit less `spent`), offering what
crossed to the outbox through `PendingEvents`, never waiting on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from pricing.invoice import BillingPeriod
from pricing.prices import Price
from service.auth.key_cache import KeyLimits
from service.db.channels import Channel
from service.db.listener import Listener
from service.errors import MeterlineError
from service.ledger.record import LedgerRecord
from service.lifecycle import Periodic
from service.limits import estimate, repository
from service.limits.budgets import Hold
from service.limits.counters import Admission, Counters, MemoryCounters
from service.limits.credit import CreditLedger, credit_ledger
from service.limits.policy import (
    COUNTERS_UNREACHABLE,
    AppliedLimits,
    Limit,
    applied_limits,
    budget_error,
    budget_unavailable,
    credit_error,
    credits_unavailable,
    duration,
    from_nano,
    rate_error,
    to_nano_down,
    to_nano_up,
)
from service.limits.ratelimit import Charge, WindowResult
from service.metrics import registry as metrics
from service.prices.cache import PriceCache
from service.proxy.context import RequestContext
from service.settings import Settings
from service.tokens.estimate import choices as requested_choices
from service.tokens.estimate import completion_limit, default_completion, prompt_tokens
from service.tokens.estimate import ready as tokenizer_ready
from service.webhooks.events import EventType
from service.webhooks.pending import PendingEvent, PendingEvents

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger("meterline.limits")

_SYNC_TIMEOUT_S = 2.0
# Failures of the counter store are logged at most this often (they come per request).
_LOG_EVERY_S = 10.0
_STORE_RETRY_S = 1.0
# After a failed sync the ledger is not asked again for this long (requests needing it are
# refused at once meanwhile, instead of each waiting for the database).
_LEDGER_RETRY_S = 1.0
# The response header that tells a client its request was capped to this many tokens.
_MAX_TOKENS_HEADER = "x-meterline-max-tokens-capped"
# A `budget.threshold` event is raised when a month's spend reaches each of these percents
# of its budget, once a month (service/webhooks); settled budgets are looked at this often.
BUDGET_THRESHOLDS = (80, 100)
_THRESHOLD_CHECK_S = 1.0


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
    # Under a budget: the `max_tokens` the upstream request is capped to (it set no limit
    # of its own), and the completion tokens its reservation pays for (a stream generating
    # more is cut). None: no cap, no cut.
    max_tokens_cap: int | None = None
    completion_allowance: int | None = None
    # Nano-USD its reservation held in every budget: the most a flagged (implausible) usage
    # claim is charged until an admin reviews it.
    reserved_nano: int = 0


@dataclass(frozen=True, slots=True)
class _Need:
    """What a request asks of its budgets, in nano-USD at the model's list price."""

    price: Price | None
    prompt_nano: int  # the prompt alone
    amount: int  # the prompt and the whole completion budget
    minimum: int | None  # least worth sending when it may be granted less (else None)
    per_choice: int  # completion tokens per choice the amount pays for
    choices: int

    @classmethod
    def of(
        cls, price: Price | None, prompt: int, per_choice: int, choices: int, unbounded: bool
    ) -> _Need:
        """An `unbounded` request (no completion limit of its own) may be granted as little
        as its prompt and one token a choice, and is then capped to what it was granted."""
        if price is None:  # an unpriced model reserves nothing
            return cls(None, 0, 0, None, per_choice, choices)
        prompt_rate, completion_rate = estimate.nano_per_token(price)
        prompt_nano = math.ceil(prompt * prompt_rate)
        amount = prompt_nano + math.ceil(per_choice * choices * completion_rate)
        minimum = None
        if unbounded and choices:
            minimum = prompt_nano + math.ceil(choices * completion_rate)
        return cls(price, prompt_nano, amount, minimum, per_choice, choices)

    def grant(self, granted: int) -> tuple[int | None, int | None]:
        """(max_tokens cap, completion allowance) of a request granted `granted` nano-USD."""
        if self.price is None or not self.choices:
            return None, None
        if self.minimum is None:
            return None, self.per_choice * self.choices
        affordable = estimate.affordable_completion(
            self.price, self.prompt_nano, granted, self.choices
        )
        cap = max(min(self.per_choice, affordable), 1)
        return cap, cap * self.choices


@dataclass(frozen=True, slots=True)
class _Budgeted:
    limit: Limit
    account_id: uuid.UUID
    month: BillingPeriod


def _counter(limit: Limit, what: str) -> str:
    return f"{limit.scope}:{limit.owner}:{what}"


_CREDITS = "credits:"


def credit_counter(account_id: uuid.UUID) -> str:
    """The one counter of a prepaid account's credit (no month: credit outlives months)."""
    return f"{_CREDITS}{account_id}"


def _credit_account(counter: str) -> uuid.UUID | None:
    return uuid.UUID(counter[len(_CREDITS) :]) if counter.startswith(_CREDITS) else None


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

# The limits of an authenticated key and its account (the key directory's `limits`).
LimitsOf = Callable[[uuid.UUID, uuid.UUID], Awaitable[KeyLimits]]


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
        limits_of: LimitsOf,
        redis: Redis | None = None,
        events: PendingEvents | None = None,
    ) -> None:
        self.settings = settings
        self._engine = engine
        self._prices = prices
        self.counters = counters
        self._limits_of = limits_of
        self._redis = redis
        self._plans: dict[KeyLimits, _Plan] = {}
        self._budgeted: dict[str, _Budgeted] = {}
        # Each prepaid account's credit as last read from the ledger.
        self._credits: dict[uuid.UUID, CreditLedger] = {}
        self._syncing: dict[str, asyncio.Task[bool]] = {}
        self._ledger_down_until = 0.0
        self._quoted_cost: Callable[[uuid.UUID, str], Decimal | None] = lambda _a, _t: None
        self._resync = Periodic("budget_resync", settings.budget_resync_s, self._resync_all, log)
        self._last_failure_log = 0.0
        self._store_down_until = 0.0
        # Budgets charged since the last threshold check, and the thresholds told already.
        self._events = events
        self._charged: set[str] = set()
        self._thresholds_told: set[tuple[str, int]] = set()
        self._thresholds = Periodic(
            "budget_thresholds", _THRESHOLD_CHECK_S, self._check_thresholds, log
        )
        # Each prepaid account's low-balance threshold (None: no `credits.low`), read with
        # its credit; an account absent is not prepaid (or not read yet). The credit alerts
        # told, per account, for the total it was granted then (a new grant re-arms them).
        self._credit_alerts: dict[uuid.UUID, Decimal | None] = {}
        self._credit_told: dict[uuid.UUID, tuple[Decimal, set[EventType]]] = {}

    @classmethod
    def create(
        cls,
        settings: Settings,
        engine: AsyncEngine,
        prices: PriceCache,
        limits_of: LimitsOf,
        listener: Listener | None = None,
        events: PendingEvents | None = None,
    ) -> Limits:
        """Counters in Redis when `redis_url` is set, in this process otherwise."""
        limits = cls._create(settings, engine, prices, limits_of, events)
        if listener is not None:
            listener.subscribe(Channel.CREDITS, limits._on_credits, limits._credits.clear)
        return limits

    @classmethod
    def _create(
        cls,
        settings: Settings,
        engine: AsyncEngine,
        prices: PriceCache,
        limits_of: LimitsOf,
        events: PendingEvents | None,
    ) -> Limits:
        if not settings.redis_url:
            if settings.workers > 1:
                log.warning(
                    "event=limits_per_worker workers=%d detail=%s",
                    settings.workers,
                    "limits are per process: each worker counts rate limits and budgets on"
                    f" its own, so a budget may be spent up to {settings.workers} times over;"
                    " set METERLINE_REDIS_URL to share them",
                )
            return cls(settings, engine, prices, MemoryCounters(), limits_of, events=events)
        # The client is imported only when it is used (5.8 MB a worker).
        from service.limits.redis_counters import connect

        redis, counters = connect(settings.redis_url, settings.redis_prefix)
        return cls(settings, engine, prices, counters, limits_of, redis, events)

    def start(self) -> None:
        self._resync.start()
        if self._events is not None:
            self._thresholds.start()

    async def stop(self) -> None:
        await self._resync.stop()
        await self._thresholds.stop()
        with contextlib.suppress(Exception):  # what was charged last is told now
            await self._check_thresholds()
        syncs = list(self._syncing.values())
        for task in syncs:
            task.cancel()
        for task in syncs:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        try:
            await self.counters.close()
        except self.counters.failures as exc:
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
        task_id: str | None = None,
        price: Price | None = None,
        provider: str | None = None,
    ) -> Grant:
        """Count the request and hold its worst-case cost, or raise a 429 (503: budget unknown).

        `price`: what the request may cost per token at most when it may be served by one of
        several models or providers (a model object's costliest candidate); else what the
        account pays for `model` served by `provider` (its rate card's price, or the list
        price)."""
        reservation = reservation or uuid.uuid4().hex
        row = await self._limits_of(key_id, account_id)
        plan = self._plans.get(row)
        if plan is None:
            if len(self._plans) >= _PLANS_MAX:
                self._plans.clear()
            plan = self._plans[row] = _Plan.of(applied_limits(self.settings, row))
        applied = plan.applied
        if applied.empty and not row.prepaid:
            return Grant(reservation)
        now = now or datetime.now(UTC)
        covered = self._covered_by_quote(account_id, task_id)
        credited = row.prepaid and not covered
        budgeted = (bool(applied.budgets) and not covered) or credited
        tokens = 0
        need = None
        if applied.tokens or budgeted:
            await tokenizer_ready()
            prompt = prompt_tokens(body)
            limit = completion_limit(body)
            choices = requested_choices(body)
            per_choice = limit or default_completion(
                body, self.settings.budget_default_completion_tokens
            )
            tokens = prompt + per_choice * choices
            if budgeted:
                price = (
                    price
                    or self._prices.tariff.customer_price(account_id, model, now, provider).price
                )
                need = _Need.of(price, prompt, per_choice, choices, unbounded=limit is None)
        prepaid = account_id if credited else None
        if time.monotonic() < self._store_down_until:
            metrics.LIMIT_ERRORS.labels("skipped").inc()
            return self._without_store(applied.budgets, budgeted, prepaid, reservation)
        try:
            return await self._admit(plan, reservation, account_id, tokens, need, now, prepaid)
        except self.counters.failures as exc:
            self._store_failed("admit", exc)
            return self._without_store(applied.budgets, budgeted, prepaid, reservation)

    @staticmethod
    def _without_store(
        budgets: Sequence[Limit], budgeted: bool, prepaid: uuid.UUID | None, reservation: str
    ) -> Grant:
        """Admission while the counter store fails: rate limits let the request pass (the
        ledger still records it), a budget or credit refuses it — admitted unheld, a burst
        would spend it many times over, and money is never overspent for availability."""
        if budgeted and budgets:
            raise budget_unavailable(budgets[0], COUNTERS_UNREACHABLE)
        if prepaid is not None:
            raise credits_unavailable(prepaid, COUNTERS_UNREACHABLE)
        return Grant(reservation)

    def _covered_by_quote(self, account_id: uuid.UUID, task_id: str | None) -> bool:
        return bool(task_id) and self._quoted_cost(account_id, task_id or "") is not None

    async def _admit(
        self,
        plan: _Plan,
        reservation: str,
        account_id: uuid.UUID,
        tokens: int,
        need: _Need | None,
        now: datetime,
        prepaid: uuid.UUID | None = None,
    ) -> Grant:
        applied = plan.applied
        requests = list(plan.requests)
        by_tokens = [
            Charge(counter, lim.limit, tokens)
            for counter, lim in zip(plan.token_counters, applied.tokens, strict=True)
        ]
        holds: list[Hold] = []
        month = BillingPeriod.of(now)
        if need is not None:
            holds = [
                Hold(_counter(lim, str(month)), lim.limit, need.amount, need.minimum)
                for lim in applied.budgets
            ]
            for lim, hold in zip(applied.budgets, holds, strict=True):
                known = self._budgeted.get(hold.counter)
                if known is None or known.limit != lim:  # new, or its budget changed
                    self._budgeted[hold.counter] = _Budgeted(lim, account_id, month)
            if prepaid is not None:
                limit = await self._credit_limit(prepaid, now)
                holds.append(Hold(credit_counter(prepaid), limit, need.amount, need.minimum))
        admission = await self._admit_synced(requests + by_tokens, holds, reservation, now)
        if not admission.allowed:
            raise self._refusal(plan, requests, by_tokens, holds, admission, month)
        cap, allowance = need.grant(admission.budget.granted) if need else (None, None)
        headers = {}
        if requests or by_tokens:
            headers = rate_headers(requests, by_tokens, admission.window)
        if cap is not None:
            headers[_MAX_TOKENS_HEADER] = str(cap)
        return Grant(
            reservation=reservation,
            window=admission.window.window,
            token_counters=tuple(c.counter for c in by_tokens),
            estimated_tokens=tokens,
            budget_counters=tuple(hold.counter for hold in holds),
            headers=headers,
            max_tokens_cap=cap,
            completion_allowance=allowance,
            reserved_nano=admission.budget.granted,
        )

    async def _admit_synced(
        self, charges: list[Charge], holds: list[Hold], reservation: str, now: datetime
    ) -> Admission:
        """Admit; a budget never synced from the ledger is synced first, else a 503."""
        ttl = self.settings.budget_reservation_ttl_s
        admission = await self.counters.admit(charges, holds, reservation, ttl, now.timestamp())
        if not admission.budget.unsynced:
            return admission
        counters = [hold.counter for hold in holds]
        if await self._sync_now(counters):
            admission = await self.counters.admit(charges, holds, reservation, ttl, now.timestamp())
            if not admission.budget.unsynced:
                return admission
        refused = counters[admission.budget.refused or 0]
        account = _credit_account(refused)
        if account is not None:
            raise credits_unavailable(account)
        raise budget_unavailable(self._budgeted[refused].limit)

    def _refusal(
        self,
        plan: _Plan,
        requests: list[Charge],
        by_tokens: list[Charge],
        holds: list[Hold],
        admission: Admission,
        month: BillingPeriod,
    ) -> MeterlineError:
        window, budget = admission.window, admission.budget
        if budget.refused is not None:
            hold = holds[budget.refused]
            account = _credit_account(hold.counter)
            if account is not None:
                metrics.LIMIT_REFUSALS.labels("credits").inc()
                return credit_error(account, hold.limit, budget.spent, budget.reserved, hold.amount)
            metrics.LIMIT_REFUSALS.labels("budget").inc()
            return budget_error(
                plan.applied.budgets[budget.refused],
                budget.spent,
                budget.reserved,
                holds[budget.refused].amount,
                month.end,
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
            task_id=ctx.task_id,
            price=ctx.costliest,
            provider=ctx.provider.name,
        )
        ctx.response_headers.update(grant.headers)
        ctx.max_tokens_cap = grant.max_tokens_cap
        ctx.completion_allowance = grant.completion_allowance
        return grant

    async def settlement(
        self, ctx: RequestContext, record: LedgerRecord | None, grant: Grant | None
    ) -> None:
        if grant is None:  # refused before this admission
            return
        if record is None:  # refused after this admission: nothing was forwarded
            await self.release(grant)
        else:
            await self.settle(
                grant, record.total_tokens, record.cost_usd, flagged=record.usage_flag is not None
            )

    def cover_quoted_tasks(self, open_cost: Callable[[uuid.UUID, str], Decimal | None]) -> None:
        """Requests on an open quoted task (`open_cost` not None) reserve no budget: the
        task's fixed price was reserved when its quote was accepted."""
        self._quoted_cost = open_cost

    # -- quotes -----------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def quote_acceptance(
        self, session: AsyncSession, quote_id: uuid.UUID
    ) -> AsyncIterator[None]:
        """Hold a quote's fixed price against its account's budget while it is accepted.

        Refused (429, nothing accepted) when the budget cannot pay it; released if the
        acceptance fails; charged as spent once it succeeded.
        """
        found = await repository.quote_budget(session, quote_id)
        if found is None:  # no such quote, accepted already, or no budget: nothing to hold
            yield
            return
        now = datetime.now(UTC)
        month = BillingPeriod.of(now)
        price = to_nano_up(found.price_usd)
        holds = []
        limit = None
        if found.budget_usd is not None:
            limit = Limit("account", found.account_id, to_nano_down(found.budget_usd))
            holds.append(Hold(_counter(limit, str(month)), limit.limit, price))
            self._budgeted.setdefault(holds[0].counter, _Budgeted(limit, found.account_id, month))
        reservation = f"quote:{quote_id}:{uuid.uuid4().hex}"  # two tries hold apart
        try:
            if found.prepaid:
                credit = await self._credit_limit(found.account_id, now)
                holds.append(Hold(credit_counter(found.account_id), credit, price))
            admission = await self._admit_synced([], holds, reservation, now)
        except self.counters.failures as exc:
            self._store_failed("admit", exc)
            if found.prepaid:  # credit is never spent unheld
                raise credits_unavailable(found.account_id, COUNTERS_UNREACHABLE) from None
            yield
            return
        counters = [hold.counter for hold in holds]
        if not admission.allowed:
            budget = admission.budget
            refused = holds[budget.refused or 0]
            if limit is None or budget.refused:
                metrics.LIMIT_REFUSALS.labels("credits").inc()
                raise credit_error(
                    found.account_id, refused.limit, budget.spent, budget.reserved, price
                )
            metrics.LIMIT_REFUSALS.labels("budget").inc()
            raise budget_error(limit, budget.spent, budget.reserved, price, month.end)
        try:
            yield
        except BaseException:
            await self._settle_counters(0, [], counters, reservation, 0)
            raise
        await self._settle_counters(0, [], counters, reservation, price)

    # -- settlement -------------------------------------------------------------------

    async def settle(
        self, grant: Grant, total_tokens: int, cost_usd: Decimal | None, flagged: bool = False
    ) -> None:
        """Replace the estimates of an admitted request by what it really used.

        A `flagged` record (a usage claim the provider made implausibly) bills nothing until
        an admin reviews it, so it is charged at most what its reservation held: a
        provider's absurd count never exhausts a customer's month, and what the budget
        allowed the request is still counted. The review's verdict reaches the budget from
        the ledger (`budget_spend`)."""
        if not grant.token_counters and not grant.budget_counters:
            return
        delta = total_tokens - grant.estimated_tokens
        cost = to_nano_up(cost_usd) if cost_usd is not None and cost_usd > 0 else 0
        if flagged:
            cost = min(cost, grant.reserved_nano)
        await self._settle_counters(
            grant.window,
            [(counter, delta) for counter in grant.token_counters],
            grant.budget_counters,
            grant.reservation,
            cost,
        )

    async def _settle_counters(
        self,
        window: int,
        corrections: Sequence[tuple[str, int]],
        budgets: Sequence[str],
        reservation: str,
        cost: int,
    ) -> None:
        try:
            await self.counters.settle(window, corrections, budgets, reservation, cost)
        except self.counters.failures as exc:
            self._store_failed("settle", exc)
        if cost:
            self._charged.update(budgets)

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

    async def _sync_now(self, counters: Sequence[str]) -> bool:
        """Sync these budgets from the ledger (joining syncs already running); True when
        all of them were synced within `_SYNC_TIMEOUT_S`."""
        if time.monotonic() < self._ledger_down_until:
            return False
        pending = {self._syncing[c] for c in counters if c in self._syncing}
        fresh = [c for c in counters if c not in self._syncing]
        if fresh:
            task = asyncio.create_task(self._sync(fresh), name="budget-sync")
            for counter in fresh:
                self._syncing[counter] = task
            task.add_done_callback(self._synced_done)
            pending.add(task)
        # asyncio.wait leaves a slow query running: a later request finds it done.
        done, late = await asyncio.wait(pending, timeout=_SYNC_TIMEOUT_S)
        return not late and all(task.result() for task in done)

    def _synced_done(self, task: asyncio.Task[bool]) -> None:
        for counter in [c for c, t in self._syncing.items() if t is task]:
            del self._syncing[counter]

    # -- credit ---------------------------------------------------------------------

    async def _credit_limit(self, account_id: uuid.UUID, now: datetime) -> int:
        """The limit of a prepaid account's counter at `now`: what the ledger says its
        requests spent since its first grant, plus what its grants active at `now` hold
        after that spend. The counter's `spent` is that same ledger figure plus what was
        settled since, so the room left is the credit not yet spent or held.

        A grant that ended after the ledger was read counts nothing, though part of what
        was settled since may have been drawn from it: the room is then smaller than the
        truth until the next read, never larger."""
        ledger = self._credits.get(account_id)
        if ledger is not None and ledger.changes_by(now):
            # A grant ended since the ledger was read: read it again, so that what was drawn
            # from that grant until its end is not counted against the others too.
            self._credits.pop(account_id, None)
            ledger = None
        if ledger is None:
            if not await self._sync_now([credit_counter(account_id)]):
                raise credits_unavailable(account_id)
            ledger = self._credits[account_id]
        return _credit_ceiling(ledger, now)

    async def _sync_credits(
        self, connection: AsyncConnection, accounts: Sequence[uuid.UUID]
    ) -> None:
        now = datetime.now(UTC)
        for account_id in accounts:
            ledger = await credit_ledger(connection, account_id, now, self._prices.book)
            spent = to_nano_up(max(ledger.allocation.usage, Decimal(0)))
            await self.counters.sync(credit_counter(account_id), spent)
            self._credits[account_id] = ledger
            prepaid, threshold = await repository.low_balance_threshold(connection, account_id)
            if prepaid:
                self._credit_alerts[account_id] = threshold
            else:
                self._credit_alerts.pop(account_id, None)
            # The ledger may show a balance below the threshold no process told: a grant
            # that expired, a void, a threshold raised, a process killed before it told.
            self._charged.add(credit_counter(account_id))

    def _on_credits(self, payload: str) -> None:
        with contextlib.suppress(ValueError):
            self.credits_changed(uuid.UUID(payload))

    def credits_changed(self, account_id: uuid.UUID) -> None:
        """The account's grants or credit settings changed: its next admission reads its
        credit again, and so does the next check of its alerts if this process tells them."""
        self._credits.pop(account_id, None)
        if account_id in self._credit_alerts:
            self._charged.add(credit_counter(account_id))

    async def credits_in_flight(
        self, account_id: uuid.UUID, ledger_usage: Decimal
    ) -> Decimal | None:
        """What a prepaid account's requests hold now, or settled beyond `ledger_usage`
        (the ledger's figure of what they spent); None when the counters cannot say."""
        try:
            spent, reserved = await self.counters.state(credit_counter(account_id))
        except self.counters.failures as exc:
            self._store_failed("state", exc)
            return None
        ahead = max(spent - to_nano_up(max(ledger_usage, Decimal(0))), 0)
        return from_nano(reserved + ahead)

    async def _sync(self, counters: Sequence[str]) -> bool:
        """Raise each budget's spend to the ledger's figure for its month, and mark it synced."""
        credited = [a for a in map(_credit_account, counters) if a is not None]
        budgeted = [(c, self._budgeted[c]) for c in counters if c in self._budgeted]
        by_month: dict[BillingPeriod, list[tuple[str, _Budgeted]]] = {}
        for counter, item in budgeted:
            by_month.setdefault(item.month, []).append((counter, item))
        book = self._prices.book
        try:
            async with self._engine.connect() as connection:
                if credited:
                    await self._sync_credits(connection, credited)
                for month, items in by_month.items():
                    start, end = month.start, month.end
                    accounts = [b.limit.owner for _, b in items if b.limit.scope == "account"]
                    keys = [b for _, b in items if b.limit.scope == "key"]
                    spent: dict[uuid.UUID, Decimal] = {}
                    if accounts:
                        spent |= await repository.budget_spend(
                            connection, accounts, None, start, end, book
                        )
                    if keys:
                        spent |= await repository.budget_spend(
                            connection,
                            list({b.account_id for b in keys}),
                            [b.limit.owner for b in keys],
                            start,
                            end,
                            book,
                        )
                    for counter, item in items:
                        amount = spent.get(item.limit.owner, Decimal(0))
                        await self.counters.sync(counter, to_nano_up(max(amount, Decimal(0))))
                        # The ledger may show a threshold no process told (one was killed).
                        self._charged.add(counter)
        except Exception as exc:  # the database or Redis may be down; the next resync retries
            self._ledger_down_until = time.monotonic() + _LEDGER_RETRY_S
            log.warning("event=budget_sync_failed error=%s", type(exc).__name__)
            return False
        return True

    async def _resync_all(self) -> None:
        current = BillingPeriod.of(datetime.now(UTC))
        for counter, item in list(self._budgeted.items()):
            if item.month != current:  # a past month's counters are no longer used
                del self._budgeted[counter]
        self._thresholds_told = {t for t in self._thresholds_told if t[0] in self._budgeted}
        await self._sync(list(self._budgeted) + [credit_counter(a) for a in self._credits])

    # -- budget thresholds (webhooks) -------------------------------------------------

    async def _check_thresholds(self) -> None:
        """Offer `budget.threshold` for each budget charged since the last check whose spend
        reached 80 % or 100 % of it, and the credit alerts of each prepaid account charged
        (or read from the ledger) since. Off the hot path: settlement only notes the
        counter."""
        if self._events is None:
            return
        events = self._events
        charged, self._charged = list(self._charged), set()
        for index, counter in enumerate(charged):
            account = _credit_account(counter)
            try:
                if account is not None:
                    await self._check_credit(events, account, counter)
                else:
                    await self._check_budget(events, counter)
            except self.counters.failures:
                self._charged.update(charged[index:])  # looked at again next round
                raise

    async def _check_budget(self, events: PendingEvents, counter: str) -> None:
        item = self._budgeted.get(counter)
        if item is None or item.limit.limit <= 0:
            return
        spent, _reserved = await self.counters.state(counter)
        for percent in BUDGET_THRESHOLDS:
            told = (counter, percent)
            if told in self._thresholds_told or spent * 100 < item.limit.limit * percent:
                continue
            self._thresholds_told.add(told)
            events.offer(_threshold_event(item, percent, spent))

    async def _check_credit(
        self, events: PendingEvents, account_id: uuid.UUID, counter: str
    ) -> None:
        """Offer `credits.low` when the prepaid balance is below the account's threshold and
        `credits.depleted` when it is 0, each once for the total the account was granted:
        the key of each event in the outbox holds that total, so several processes (or this
        one after a restart) store it once, and a new grant re-arms both.

        The balance is the one admission enforces: what the grants held when the ledger was
        last read, less what was settled since (the shared counter). It is known as soon
        as the request that lowered it settled, without reading the ledger again."""
        now = datetime.now(UTC)
        ledger = self._credits.get(account_id)
        if ledger is None or ledger.changes_by(now):
            if not await self._sync_now([counter]):
                self._charged.add(counter)  # the ledger cannot be read now: next round
                return
            ledger = self._credits.get(account_id)
        if ledger is None or account_id not in self._credit_alerts or not ledger.grants:
            return  # not prepaid, or never given credit: nothing to fall from
        threshold = self._credit_alerts[account_id]
        spent, _reserved = await self.counters.state(counter)
        balance = from_nano(max(_credit_ceiling(ledger, now) - spent, 0))
        granted = sum((grant.amount_usd for grant in ledger.grants), Decimal(0))
        due = []
        if threshold is not None and balance < threshold:
            due.append(EventType.CREDITS_LOW)
        if balance <= 0:
            due.append(EventType.CREDITS_DEPLETED)
        told_for, told = self._credit_told.get(account_id, (granted, set()))
        if told_for != granted:
            told = set()
        self._credit_told[account_id] = (granted, told)
        for type_ in due:
            if type_ not in told:
                told.add(type_)
                events.offer(_credit_event(type_, account_id, balance, threshold, granted, now))


def _threshold_event(item: _Budgeted, percent: int, spent: int) -> PendingEvent:
    limit = item.limit
    data: dict[str, Any] = {
        "account_id": str(item.account_id),
        "scope": limit.scope,
        "key_id": str(limit.owner) if limit.scope == "key" else None,
        "period": str(item.month),
        "threshold_percent": percent,
        "budget_usd": f"{from_nano(limit.limit):f}",
        "spent_usd": f"{from_nano(spent):f}",
    }
    return PendingEvent(
        EventType.BUDGET_THRESHOLD,
        data,
        item.account_id,
        f"budget.threshold:{limit.scope}:{limit.owner}:{item.month}:{percent}",
        datetime.now(UTC),
    )


def _credit_ceiling(ledger: CreditLedger, now: datetime) -> int:
    """The limit of a prepaid account's counter at `now` (see `Limits._credit_limit`)."""
    return to_nano_up(max(ledger.allocation.usage, Decimal(0))) + to_nano_down(
        ledger.available_at(now)
    )


def _credit_event(
    type_: EventType,
    account_id: uuid.UUID,
    balance: Decimal,
    threshold: Decimal | None,
    granted: Decimal,
    at: datetime,
) -> PendingEvent:
    data: dict[str, Any] = {
        "account_id": str(account_id),
        "balance_usd": f"{balance:f}",
        "threshold_usd": None if threshold is None else f"{threshold:f}",
    }
    return PendingEvent(type_, data, account_id, f"{type_.value}:{account_id}:{granted:f}", at)
