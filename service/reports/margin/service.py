"""The margin report: per task type and model, what fixed prices earned against token cost.

Covers the quoted tasks completed (or expired) in the period, the month each is billed in,
whatever month their requests ran in. Revenue is what each was billed, as fixed at its
completion: its fixed price (succeeded, or expired under the `fixed_price` policy), its
token cost (failed or expired under a `cost` policy), or nothing. Calibration is reported twice:
against the price (margin included) and against the quote's cost basis, the quantile that
`confidence` asked for — the one a well-calibrated quote keeps at about `confidence`.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from pricing.quote import margin, share
from service.reports.margin.repository import margin_rows
from service.reports.margin.schemas import MarginReport, MarginRow
from service.schemas import parse_period


def period_bounds(period: str) -> tuple[datetime, datetime]:
    month = parse_period(period)
    return month.start, month.end


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
        confidence=confidence,
        within_price_share=share(row.within_price, row.tasks),
        within_quantile_share=share(row.within_quantile, row.tasks),
    )


async def margin_report(
    session: AsyncSession, period: str, account_id: uuid.UUID | None
) -> MarginReport:
    start, end = period_bounds(period)
    rows = [_row(r) for r in await margin_rows(session, start, end, account_id)]
    # The grand total (grouping set `()`) is always the last row; with no task it is all zero.
    total = rows.pop()
    total.task_type = total.model = None
    return MarginReport(period=period, account_id=account_id, rows=rows, total=total)
