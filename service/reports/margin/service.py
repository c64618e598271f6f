"""The margin report: per task type and model, what fixed prices earned against token cost.

Covers the quoted tasks completed (or expired) in the period, the month each is billed in,
whatever month their requests ran in. Revenue is what each was billed, as fixed at its
completion: its fixed price (succeeded, or expired under the `fixed_price` policy), its
token cost (failed or expired under a `cost` policy), or nothing. Calibration is reported twice:
against the price (margin included) and against the quote's cost basis, the quantile that
`confidence` asked for — the one a well-calibrated quote keeps at about `confidence`.

Token usage billed per token is reported too, per account, model and task type: revenue
(the rows' `cost_usd`, what invoices bill) against provider cost (`provider_cost_usd`),
the margin over the usage whose provider cost is known, and the share that is unknown.
"""

from __future__ import annotations

import uuid
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from pricing.invoice import BillingPeriod
from pricing.quote import margin, share
from service.reports.margin.repository import margin_rows, usage_margin_rows
from service.reports.margin.schemas import MarginReport, MarginRow, UsageMargin, UsageMarginRow


def _row(row: Any) -> MarginRow:
    revenue = row.fixed_revenue + row.cost_revenue
    kept = margin(revenue, row.cost)
    confidence = None
    if row.tasks:
        confidence = (row.confidence_sum / row.tasks).quantize(Decimal("0.0001"))
    return MarginRow(
        task_type=row.task_type,
        model=row.model,
        tasks=row.tasks,
        succeeded=row.succeeded,
        failed=row.failed,
        expired=row.expired,
        fixed_price_revenue_usd=row.fixed_revenue,
        at_cost_revenue_usd=row.cost_revenue,
        revenue_usd=revenue,
        cost_usd=row.cost,
        margin_usd=kept.amount,
        margin_pct=kept.percent,
        provider_cost_usd=row.provider_cost,
        unknown_provider_cost_requests=row.unknown_cost_requests,
        confidence=confidence,
        within_price_share=share(row.within_price, row.tasks),
        within_quantile_share=share(row.within_quantile, row.tasks),
    )


def _usage_row(row: Any) -> UsageMarginRow:
    kept = margin(row.revenue_known_cost, row.provider_cost)
    unknown = None
    if row.tokens:
        unknown = (Decimal(row.unknown_cost_tokens) / row.tokens).quantize(
            Decimal("0.0001"), rounding=ROUND_HALF_UP
        )
    elif row.requests:
        unknown = share(row.unknown_cost_requests, row.requests)
    return UsageMarginRow(
        account_id=row.account_id,
        model=row.model,
        task_type=row.task_type,
        requests=row.requests,
        unpriced_requests=row.unpriced_requests,
        revenue_usd=row.revenue,
        provider_cost_usd=row.provider_cost,
        margin_usd=kept.amount,
        margin_pct=kept.percent,
        unknown_provider_cost_requests=row.unknown_cost_requests,
        unknown_provider_cost_share=unknown,
    )


async def margin_report(
    session: AsyncSession, period: BillingPeriod, account_id: uuid.UUID | None
) -> MarginReport:
    rows = [_row(r) for r in await margin_rows(session, period.start, period.end, account_id)]
    # The grand total (grouping set `()`) is always the last row; with no task it is all zero.
    total = rows.pop()
    total.task_type = total.model = None
    usage = [
        _usage_row(r)
        for r in await usage_margin_rows(session, period.start, period.end, account_id)
    ]
    usage_total = usage.pop()
    return MarginReport(
        period=str(period),
        account_id=account_id,
        rows=rows,
        total=total,
        usage=UsageMargin(rows=usage, total=usage_total),
    )
