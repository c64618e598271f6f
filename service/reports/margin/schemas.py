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
    provider_cost_usd: DecimalString = Field(
        description="What the upstreams charged for these requests, where known."
    )
    unknown_provider_cost_requests: int = Field(
        description="Requests of these tasks whose provider cost is unknown."
    )
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


class UsageMarginRow(BaseModel):
    """Token usage billed per token in the period, of one account, model and task type."""

    account_id: uuid.UUID | None
    model: str | None
    task_type: str | None
    requests: int
    unpriced_requests: int = Field(
        description="Requests stored without a customer price (no revenue yet: priced on"
        " the next invoice draft)."
    )
    revenue_usd: DecimalString = Field(
        description="What the customer is billed for these tokens, exact (the invoice's"
        " amounts before each line is rounded to the cent)."
    )
    provider_cost_usd: DecimalString = Field(
        description="What the upstreams charged for the requests whose cost is known."
    )
    margin_usd: DecimalString = Field(
        description="Revenue minus provider cost, over the requests whose provider cost is"
        " known (the others would make it a guess)."
    )
    margin_pct: DecimalString | None = Field(
        description="Margin as % of that revenue; null without revenue."
    )
    unknown_provider_cost_requests: int
    unknown_provider_cost_share: DecimalString | None = Field(
        description="Share of the tokens whose provider cost is unknown (0 to 1)."
    )


class UsageMargin(BaseModel):
    rows: list[UsageMarginRow]
    total: UsageMarginRow


class MarginReport(BaseModel):
    period: str
    account_id: uuid.UUID | None
    rows: list[MarginRow] = Field(description="Quoted tasks, per task type and model.")
    total: MarginRow
    usage: UsageMargin = Field(
        description="Token usage billed per token, per account, model and task type: what"
        " it earned against what the upstreams charged."
    )
