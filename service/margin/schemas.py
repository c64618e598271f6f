from __future__ import annotations

import uuid

from pydantic import BaseModel, Field

from service.schemas import DecimalString


class MarginRow(BaseModel):
    """Quoted tasks completed in the period, of one task type on one model."""

    task_type: str | None
    model: str | None
    tasks: int = Field(description="Quoted tasks completed in the period.")
    succeeded: int
    failed: int
    fixed_price_revenue_usd: DecimalString = Field(description="Fixed prices of succeeded tasks.")
    failed_at_cost_revenue_usd: DecimalString = Field(
        description="Cost of failed tasks of accounts whose failed-task policy is `cost`."
    )
    revenue_usd: DecimalString
    cost_usd: DecimalString = Field(description="Exact actual token cost of these tasks.")
    margin_usd: DecimalString = Field(description="Revenue minus cost.")
    margin_pct: DecimalString | None = Field(description="Margin as % of revenue.")
    confidence: DecimalString | None = Field(
        description="Average confidence the quotes were asked for."
    )
    within_price_share: DecimalString | None = Field(
        description="Share of these tasks whose actual cost stayed within the quoted price."
    )
    within_quantile_share: DecimalString | None = Field(
        description="Share whose actual cost stayed within the quote's cost basis (its"
        " quantile, before margin): the figure to hold against `confidence`."
    )


class MarginReport(BaseModel):
    period: str
    account_id: uuid.UUID | None
    rows: list[MarginRow]
    total: MarginRow
