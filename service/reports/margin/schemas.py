from __future__ import annotations

import uuid

from pydantic import BaseModel, Field

from service.schemas import DecimalString


class MarginRow(BaseModel):
    """Quoted tasks completed in the period, of one task type on one model."""

    task_type: str | None
    model: str | None
    tasks: int = Field(description="Quoted tasks completed (or expired) in the period.")
    succeeded: int
    failed: int
    expired: int = Field(description="Tasks still open at their deadline.")
    fixed_price_revenue_usd: DecimalString = Field(
        description="Fixed prices of the tasks billed them (succeeded, or expired under the"
        " `fixed_price` policy)."
    )
    at_cost_revenue_usd: DecimalString = Field(
        description="Token cost of the tasks billed it (failed or expired under a `cost`"
        " policy in force at their completion)."
    )
    revenue_usd: DecimalString
    cost_usd: DecimalString = Field(
        description="Exact token cost of the requests these tasks cover (from acceptance on)."
    )
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
