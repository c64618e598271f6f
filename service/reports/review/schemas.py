from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.schemas import DecimalString, Prose

ReviewDecision = Literal["accepted", "adjusted"]

Note = Annotated[Prose, Field(max_length=2000)]


class ReviewOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    decision: ReviewDecision
    adjustment_request_id: str | None = Field(
        description="The adjustment row the review added to the ledger (`adjusted`)."
    )
    note: str | None
    reviewed_at: datetime


class FlaggedUsageRow(BaseModel):
    request_id: str
    account_id: uuid.UUID
    occurred_at: datetime
    recorded_at: datetime
    model: str = Field(description="The model asked for.")
    upstream_model: str | None
    endpoint: str
    status_code: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int
    reasoning_tokens: int
    cost_usd: DecimalString | None = Field(description="As claimed, at the row's price.")
    usage_flag: str = Field(
        description="`completion_over_limit`: more completion tokens than the request allowed;"
        " `implausible_count`: a count past any request's size."
    )
    review: ReviewOut | None = Field(description="None: not reviewed, blocks finalization.")


class FlaggedUsagePage(BaseModel):
    period: str
    data: list[FlaggedUsageRow]
    has_more: bool
    next_cursor: str | None


class FlaggedUsageAccept(BaseModel):
    model_config = ConfigDict(extra="forbid")

    note: Note | None = None


class FlaggedUsageAdjust(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # NUMERIC(24, 12), like every exact amount of the ledger.
    amount_usd: Annotated[
        Decimal,
        Field(
            max_digits=24,
            decimal_places=12,
            allow_inf_nan=False,
            description="The correction as an exact decimal string, negative to credit:"
            " minus the row's `cost_usd` bills the claim nothing.",
            examples=["-12.500000000000"],
        ),
    ]
    note: Note | None = None


class QuarantinedRow(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    request_id: str
    account_id: uuid.UUID | None
    occurred_at: datetime | None
    quarantined_at: datetime
    source: Literal["live", "replay"] = Field(
        description="Refused in a live batch, or when a spooled batch was replayed."
    )
    sqlstate: str | None = Field(description="Postgres' error code (`22P05`, `22003`, …).")
    reason: str = Field(description="Postgres' message.")
    record: str = Field(description="The record as it was to be stored (its JSON line).")
