"""Quotes: price one task in advance from the account's history, or estimate it; accept one.

History is the account's own: its completed tasks (succeeded or failed) of the same task
type on the same model, completed within the look-back window (`quote_lookback_days`,
counted in whole UTC days), whose cost is fully priced. With at least `quote_min_sample`
of them the cost basis is their `confidence` quantile; otherwise it is an estimate from
the prompt's tokens plus the completion budget at the model's list price. Another
account's tasks never influence a quote: a customer's prompts drive its costs.
"""

from __future__ import annotations

import logging
import secrets
import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession

from pricing.prices import PriceBook
from pricing.quote import (
    CostSource,
    QuoteBasis,
    cost_cap,
    estimate_cost,
    locate_rank,
    mean_cost,
    quantile_rank,
    quote_price,
)
from pricing.rate_cards import Tariff
from service.auth.principal import Principal
from service.db.models import Quote
from service.errors import Conflict, MeterlineError, NotFound, Unprocessable
from service.parts import LiveTasks
from service.quotes.repository import QuoteRepository
from service.quotes.schemas import QuoteAccept, QuoteCreate, QuoteOut
from service.settings import Settings
from service.tasks.completion import task_out
from service.tasks.repository import EMPTY_USAGE
from service.tasks.schemas import TaskOut
from service.tasks.service import open_quoted_task
from service.tokens.estimate import count_tokens, prompt_text
from service.tokens.estimate import ready as tokenizer_ready

log = logging.getLogger("meterline.quotes")


class QuoteExpired(MeterlineError):
    status_code = 410
    code = "quote_expired"
    description = "The quote expired: ask for a new one."


class QuoteAlreadyAccepted(Conflict):
    code = "quote_already_accepted"
    description = "The quote is accepted already."


class ModelNotPriced(Unprocessable):
    code = "model_not_priced"
    description = "The model has no price: a task on it cannot be quoted."


class QuoteNeedsEstimateInputs(Unprocessable):
    code = "quote_needs_estimate_inputs"
    description = (
        "Too little history to quote from: send `messages` or `prompt_tokens`, and"
        " `max_completion_tokens`, for an estimate."
    )


def history_start(now: datetime, lookback_days: int) -> datetime:
    """First instant of the look-back window: midnight UTC, `lookback_days` days ago."""
    day = (now.astimezone(UTC) - timedelta(days=lookback_days)).date()
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def quote_out(quote: Quote, task_id: str | None = None) -> QuoteOut:
    out = QuoteOut.model_validate(quote)
    out.task_id = task_id
    return out


def _quote_account(caller: Principal, account_id: uuid.UUID | None) -> uuid.UUID:
    scoped = caller.scope(account_id)
    if scoped is None:
        raise Unprocessable(
            "body.account_id: required with the admin token", param="body.account_id"
        )
    return scoped


def _prompt_tokens(data: QuoteCreate) -> int | None:
    if data.prompt_tokens is not None:
        return data.prompt_tokens
    if data.messages is not None:
        try:
            return count_tokens(prompt_text({"messages": data.messages}))
        except (TypeError, ValueError, AttributeError):
            raise Unprocessable(
                "body.messages: not a list of chat messages", param="body.messages"
            ) from None
    return None


async def create_quote(
    session: AsyncSession,
    settings: Settings,
    book: PriceBook,
    caller: Principal,
    data: QuoteCreate,
    now: datetime | None = None,
    *,
    tariff: Tariff | None = None,
    provider: str | None = None,
) -> QuoteOut:
    """A quote made at `now` (default: this process's clock). An estimate prices its tokens
    at what `provider` charges for the model (from `tariff`) where that is known: the cost
    the operator risks; else at the list price."""
    account_id = _quote_account(caller, data.account_id)
    repository = QuoteRepository(session)
    account = await repository.account(account_id)
    if account is None:
        raise NotFound(f"account {account_id} not found", param="body.account_id")
    now = now or datetime.now(UTC)
    price = book.price_for(data.model, now)
    upstream = tariff.provider_cost(provider, data.model, now) if tariff is not None else None
    if price is None and upstream is None:
        raise ModelNotPriced(
            f"model {data.model!r} has no price; a task on it cannot be quoted", param="body.model"
        )
    confidence = data.confidence if data.confidence is not None else settings.quote_confidence
    margin = account.quote_margin if account.quote_margin is not None else settings.quote_margin
    if data.prompt_tokens is None and data.messages is not None:
        await tokenizer_ready()
    prompt_tokens = _prompt_tokens(data)

    since = history_start(now, settings.quote_lookback_days)
    histogram = await repository.cost_histogram(account_id, data.task_type, data.model, since)
    if histogram.sample_size >= settings.quote_min_sample:
        basis = QuoteBasis.HISTORY
        cost_source: CostSource | None = None
        expected = mean_cost(histogram.total_cost, histogram.sample_size)
        position = locate_rank(histogram.buckets, quantile_rank(histogram.sample_size, confidence))
        walked = await repository.cost_at(account_id, data.task_type, data.model, since, position)
        # A task completing between the two reads can shift the bucket by one; its last
        # cost is then the nearest honest answer.
        if walked is None:
            position = locate_rank(histogram.buckets, histogram.sample_size)
            walked = await repository.cost_at(
                account_id, data.task_type, data.model, since, position
            )
        basis_cost = walked if walked is not None else expected
    else:
        if prompt_tokens is None or data.max_completion_tokens is None:
            raise QuoteNeedsEstimateInputs(
                f"not enough history for {data.task_type!r} on {data.model!r}: "
                f"{histogram.sample_size} completed tasks in the last "
                f"{settings.quote_lookback_days} days, {settings.quote_min_sample} needed; "
                "send `messages` or `prompt_tokens`, and `max_completion_tokens`, to get an "
                "estimate",
                param="body.max_completion_tokens",
            )
        basis = QuoteBasis.ESTIMATE
        cost_source = CostSource.LIST_PRICE if upstream is None else CostSource.PROVIDER_COST
        rates = upstream or price
        assert rates is not None
        expected = estimate_cost(prompt_tokens, data.max_completion_tokens, rates)
        basis_cost = expected

    quote = await repository.add(
        Quote(
            account_id=account_id,
            task_type=data.task_type,
            model=data.model,
            basis=basis,
            cost_source=cost_source,
            sample_size=histogram.sample_size,
            confidence=confidence,
            margin=margin,
            prompt_tokens=prompt_tokens,
            max_completion_tokens=data.max_completion_tokens,
            expected_cost_usd=expected,
            quantile_cost_usd=basis_cost,
            price_usd=quote_price(basis_cost, margin),
            valid_until=now + timedelta(seconds=settings.quote_valid_for_s),
        )
    )
    log.info(
        "event=quote_created quote_id=%s account_id=%s basis=%s sample_size=%d price_usd=%s",
        quote.id,
        account_id,
        basis,
        histogram.sample_size,
        quote.price_usd,
    )
    return quote_out(quote)


async def get_quote(session: AsyncSession, caller: Principal, quote_id: uuid.UUID) -> QuoteOut:
    repository = QuoteRepository(session)
    quote = await repository.get(quote_id)
    missing = NotFound(f"quote {quote_id} not found", param="path.quote_id")
    if quote is None:
        raise missing
    caller.require_account(quote.account_id, missing)
    return quote_out(quote, await repository.task_of(quote.id))


async def accept_quote(
    session: AsyncSession,
    settings: Settings,
    guard: LiveTasks | None,
    caller: Principal,
    quote_id: uuid.UUID,
    data: QuoteAccept,
    now: datetime | None = None,
) -> TaskOut:
    """Accept the quote at `now` (default: the database's): the task it opens covers the
    requests from then on and expires `task_expiry_s` later."""
    repository = QuoteRepository(session)
    quote = await repository.get(quote_id, for_update=True)
    missing = NotFound(f"quote {quote_id} not found", param="path.quote_id")
    if quote is None:
        raise missing
    caller.require_account(quote.account_id, missing)
    if quote.accepted_at is not None:
        raise QuoteAlreadyAccepted(
            f"quote {quote_id} was already accepted (task {await repository.task_of(quote.id)!r})"
        )
    accepted_at = now or await repository.now()
    if quote.valid_until <= accepted_at:
        raise QuoteExpired(
            f"quote {quote_id} expired at {quote.valid_until.isoformat()}; ask for a new quote"
        )
    task_id = data.task_id or f"task_{secrets.token_urlsafe(18)}"
    cap = cost_cap(quote.price_usd, settings.task_cost_cap_multiple)
    task = await open_quoted_task(
        session,
        guard,
        {
            "account_id": quote.account_id,
            "external_id": task_id,
            "task_type": quote.task_type,
            "model": quote.model,
            "quote_id": quote.id,
            "fixed_price_usd": quote.price_usd,
            "cost_cap_usd": cap,
            # Its deadline counts from acceptance, the task row's `created_at`.
            "created_at": accepted_at,
            "expires_at": accepted_at + timedelta(seconds=settings.task_expiry_s),
        },
        cap,
    )
    await repository.mark_accepted(quote, accepted_at)
    log.info(
        "event=quote_accepted quote_id=%s account_id=%s task_id=%s price_usd=%s",
        quote.id,
        quote.account_id,
        task_id,
        quote.price_usd,
    )
    return task_out(task, EMPTY_USAGE, quote.account_id, task_id)
