"""Every query of the limits: a month's spend, and the budget a quote's acceptance holds its
fixed price against (the limits of keys and their accounts come with the key directory,
service/auth/repository.py)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import TextClause, select, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from pricing.cost import TokenUsage, totals_cost
from pricing.prices import PriceBook
from service.db.models import Account, BillingMode, CreditGrant


@dataclass(frozen=True, slots=True)
class QuoteBudget:
    account_id: uuid.UUID
    price_usd: Decimal
    budget_usd: Decimal | None
    prepaid: bool


_QUOTE_BUDGET = text(
    "SELECT q.account_id, q.price_usd, a.monthly_budget_usd, a.billing_mode = 'prepaid' "
    "FROM quotes q JOIN accounts a ON a.id = q.account_id "
    "WHERE q.id = :id AND q.accepted_at IS NULL "
    "AND (a.monthly_budget_usd IS NOT NULL OR a.billing_mode = 'prepaid')"
)


async def quote_budget(session: AsyncSession, quote_id: uuid.UUID) -> QuoteBudget | None:
    """The fixed price of a quote not yet accepted, with its account's budget and whether it
    is prepaid (None when neither limits it)."""
    row = (await session.execute(_QUOTE_BUDGET, {"id": quote_id})).first()
    return None if row is None else QuoteBudget(row[0], row[1], row[2], bool(row[3]))


# A month's spend against a budget is what the month bills, as far as it is known now:
#
# - the cost of its ledger rows (usage and adjustments), priced at their own `occurred_at`:
#   their stored cost, else the price in force then when one was added since;
# - minus the rows a quoted task covers (from its acceptance on) unless the task is billed
#   at cost (`billed_as`): while it is open, or billed its fixed price or nothing, its
#   tokens are not billed;
# - plus the fixed prices of the quoted tasks accepted in the month (an account's budget
#   only) while they are open (reserved when the quote was accepted) or once billed their
#   fixed price: a task billed at cost counts its tokens instead, a free one nothing;
# - minus the flagged usage claims no admin has reviewed: they bill nothing until an admin
#   accepts one (then it counts as claimed) or corrects it (as claimed plus the adjustment).
#   The serving process counts such a request at most at what its reservation held.
#
# `{owner}` is `account_id` (account budgets) or `key_id` (key budgets, their account
# given too so the account's index narrows the scan to its month).
_COVERED = (
    "EXISTS (SELECT 1 FROM tasks t "
    "WHERE t.account_id = l.account_id AND t.external_id = l.task_id "
    "AND t.quote_id IS NOT NULL AND l.occurred_at >= t.created_at "
    "AND (t.status = 'open' OR t.billed_as <> 'cost'))"
)
_UNREVIEWED = (
    "(l.usage_flag IS NOT NULL AND NOT EXISTS (SELECT 1 FROM flagged_usage_reviews r "
    "WHERE r.request_id = l.request_id AND r.occurred_at = l.occurred_at))"
)
_ROWS = (
    "FROM usage_ledger l WHERE l.account_id = ANY(:accounts) {keys}"
    "AND l.occurred_at >= :start AND l.occurred_at < :end AND NOT "
    + _COVERED
    + " AND NOT "
    + _UNREVIEWED
)
# Each row falls in the span of `:bounds` that holds its time (`width_bucket`: 1 for the
# first span); a month's budget has one span, a credit balance one per change of its grants.
_SPAN = "width_bucket(l.occurred_at, CAST(:bounds AS timestamptz[]))"
_PRICED = (
    "SELECT l.{owner} AS owner, "
    + _SPAN
    + " AS span, SUM(l.cost_usd) AS spent "
    + _ROWS
    + " AND l.cost_usd IS NOT NULL GROUP BY 1, 2"
)
_UNPRICED_MODELS = "SELECT DISTINCT l.requested_model " + _ROWS + " AND l.cost_usd IS NULL"
# Rows without a stored cost, summed per span of their model's price timeline (the spans
# with a price, given as arrays): each span is then priced by the version of that time.
_UNPRICED = (
    "SELECT l.{owner} AS owner, " + _SPAN + " AS span, s.segment, "
    "SUM(l.prompt_tokens) AS prompt, "
    "SUM(l.completion_tokens) AS completion, "
    "SUM(least(greatest(l.cached_tokens, 0), l.prompt_tokens)) AS cached "
    "FROM usage_ledger l JOIN unnest(CAST(:models AS text[]), CAST(:segments AS int[]), "
    "CAST(:starts AS timestamptz[]), CAST(:ends AS timestamptz[])) "
    "AS s(model, segment, span_start, span_end) ON l.requested_model = s.model "
    "AND (s.span_start IS NULL OR l.occurred_at >= s.span_start) "
    "AND (s.span_end IS NULL OR l.occurred_at < s.span_end) "
    "WHERE l.account_id = ANY(:accounts) {keys}AND l.occurred_at >= :start "
    "AND l.occurred_at < :end AND l.cost_usd IS NULL AND NOT "
    + _COVERED
    + " AND NOT "
    + _UNREVIEWED
    + " GROUP BY 1, 2, 3"
)
_FIXED_PRICES = text(
    "SELECT t.account_id AS owner, "
    "width_bucket(t.created_at, CAST(:bounds AS timestamptz[])) AS span, "
    "SUM(t.fixed_price_usd) AS spent FROM tasks t "
    "WHERE t.account_id = ANY(:accounts) AND t.quote_id IS NOT NULL "
    "AND t.created_at >= :start AND t.created_at < :end "
    "AND (t.status = 'open' OR t.billed_as = 'fixed_price') "
    "GROUP BY 1, 2"
)


def _spend_sql(template: str, by_key: bool) -> TextClause:
    keys = "AND l.key_id = ANY(:keys) " if by_key else ""
    return text(template.format(owner="key_id" if by_key else "account_id", keys=keys))


async def budget_spend(
    connection: AsyncConnection,
    accounts: Sequence[uuid.UUID],
    keys: Sequence[uuid.UUID] | None,
    start: datetime,
    end: datetime,
    book: PriceBook,
) -> dict[uuid.UUID, Decimal]:
    """The month's spend of each account (`keys` None) or of each key of `accounts`."""
    spans = await spend_by_span(connection, accounts, keys, [start, end], book)
    return {owner: amounts[0] for owner, amounts in spans.items()}


async def spend_by_span(
    connection: AsyncConnection,
    accounts: Sequence[uuid.UUID],
    keys: Sequence[uuid.UUID] | None,
    bounds: Sequence[datetime],
    book: PriceBook,
) -> dict[uuid.UUID, list[Decimal]]:
    """The spend of each account (`keys` None) or key in each span `[bounds[i],
    bounds[i + 1])`, counted as a month's budget counts it (above)."""
    by_key = keys is not None
    spans_count = len(bounds) - 1
    if spans_count < 1:
        return {}
    params: dict[str, Any] = {
        "accounts": list(accounts),
        "start": bounds[0],
        "end": bounds[-1],
        "bounds": list(bounds),
    }
    if by_key:
        params["keys"] = list(keys or ())
    spent: dict[uuid.UUID, list[Decimal]] = {}

    def add(owner: uuid.UUID, span: int, amount: Decimal | None) -> None:
        amounts = spent.setdefault(owner, [Decimal(0)] * spans_count)
        amounts[span - 1] += amount or Decimal(0)

    for row in await connection.execute(_spend_sql(_PRICED, by_key), params):
        add(row.owner, row.span, row.spent)
    models = (await connection.execute(_spend_sql(_UNPRICED_MODELS, by_key), params)).scalars()
    spans = [
        (model, index, span)
        for model in models
        for index, span in enumerate(book.segments(model))
        if span.price is not None
    ]
    if spans:
        rows = await connection.execute(
            _spend_sql(_UNPRICED, by_key),
            {
                **params,
                "models": [model for model, _, _ in spans],
                "segments": list(range(len(spans))),
                "starts": [span.start for _, _, span in spans],
                "ends": [span.end for _, _, span in spans],
            },
        )
        for row in rows:
            price = spans[row.segment][2].price
            assert price is not None
            usage = TokenUsage(int(row.prompt), int(row.completion), int(row.cached))
            add(row.owner, row.span, totals_cost(usage, price))
    if not by_key:
        for row in await connection.execute(_FIXED_PRICES, params):
            add(row.owner, row.span, row.spent)
    return spent


# A grant's columns, read on a plain connection (the proxy's) as well as in a session.
_GRANT_COLUMNS = (
    CreditGrant.id,
    CreditGrant.account_id,
    CreditGrant.kind,
    CreditGrant.amount_usd,
    CreditGrant.priority,
    CreditGrant.expires_at,
    CreditGrant.reference,
    CreditGrant.created_at,
    CreditGrant.voided_at,
)


async def grants_of(connection: AsyncConnection, account_id: uuid.UUID) -> Sequence[Any]:
    """All of an account's grants, voided and expired ones too, oldest first (rows with the
    columns of `CreditGrant`)."""
    statement = (
        select(*_GRANT_COLUMNS)
        .where(CreditGrant.account_id == account_id)
        .order_by(CreditGrant.created_at, CreditGrant.id)
    )
    return (await connection.execute(statement)).all()


async def accounts_with_credit(
    connection: AsyncConnection, accounts: Sequence[uuid.UUID]
) -> set[uuid.UUID]:
    """Those of `accounts` that were ever given credit."""
    statement = (
        select(CreditGrant.account_id).where(CreditGrant.account_id.in_(list(accounts))).distinct()
    )
    return set((await connection.execute(statement)).scalars())


async def low_balance_threshold(
    connection: AsyncConnection, account_id: uuid.UUID
) -> tuple[bool, Decimal | None]:
    """(whether the account is prepaid, its low-balance threshold): what the credit alerts
    (`credits.low`, `credits.depleted`) are raised by."""
    statement = select(
        Account.billing_mode == BillingMode.PREPAID, Account.low_balance_threshold_usd
    ).where(Account.id == account_id)
    row = (await connection.execute(statement)).first()
    return (False, None) if row is None else (bool(row[0]), row[1])
