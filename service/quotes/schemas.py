from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from pricing.quote import CostSource, QuoteBasis
from service.schemas import DecimalString, Text

Label = Annotated[Text, Field(min_length=1)]
Confidence = Annotated[Decimal, Field(gt=0, lt=1, max_digits=6, decimal_places=4)]
TaskIdString = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[\x21-\x7e]+$")]


class QuoteCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    account_id: uuid.UUID | None = Field(
        default=None, description="Required with the admin token; a customer key: its own."
    )
    task_type: Label = Field(max_length=128, examples=["summarize"])
    model: Label = Field(max_length=256)
    messages: list[dict[str, Any]] | None = Field(
        default=None,
        max_length=10_000,
        description="The task's first prompt; its tokens are counted for an estimate.",
    )
    prompt_tokens: int | None = Field(
        default=None, ge=0, le=100_000_000, description="Instead of `messages`."
    )
    max_completion_tokens: int | None = Field(
        default=None, ge=0, le=100_000_000, description="The completion budget of an estimate."
    )
    confidence: Confidence | None = Field(
        default=None,
        description="Quantile of past costs the price covers (default 0.9: the 90th percentile).",
    )


class QuoteAccept(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task_id: TaskIdString | None = Field(
        default=None,
        description="The `X-Task-Id` to bind (new in the account); default: one is generated.",
    )


class QuoteOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    account_id: uuid.UUID
    task_type: str
    model: str
    basis: QuoteBasis = Field(
        description="`history`: a quantile of the account's completed tasks' actual costs;"
        " `estimate`: prompt tokens plus the completion budget at list price."
    )
    cost_source: CostSource | None = Field(
        default=None,
        description="An estimate's: `provider_cost` (what the upstream charges, where known:"
        " the operator's risk) or `list_price`; null for a history quote (the actual costs"
        " of past tasks).",
    )
    sample_size: int = Field(description="Completed tasks the history basis drew on.")
    confidence: DecimalString
    margin: DecimalString = Field(description="0.20 = 20 % on top of the cost basis.")
    prompt_tokens: int | None
    max_completion_tokens: int | None
    expected_cost_usd: DecimalString = Field(description="Mean past cost, or the estimate.")
    quantile_cost_usd: DecimalString = Field(description="The cost basis the price covers.")
    price_usd: DecimalString = Field(description="Fixed price: basis plus margin, rounded up.")
    valid_until: datetime
    created_at: datetime
    accepted_at: datetime | None
    task_id: str | None = Field(default=None, description="The task opened by accepting.")
