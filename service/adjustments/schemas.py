from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator

from service.schemas import BillableTime, DecimalString, Prose

# NUMERIC(24, 12), like every exact amount of the ledger.
AdjustmentAmount = Annotated[
    Decimal,
    Field(
        max_digits=24,
        decimal_places=12,
        allow_inf_nan=False,
        description="Exact decimal string, at most 12 decimal places: positive charges the"
        " account, negative credits it.",
        examples=["-12.50"],
    ),
]
Reason = Annotated[Prose, Field(min_length=1, max_length=2000)]


class AdjustmentCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    amount_usd: AdjustmentAmount
    reason: Reason
    occurred_at: BillableTime | None = Field(
        default=None,
        description="RFC 3339, not in the future; the month it bills. Default: now. A month"
        " whose invoice is finalized gets it as late usage on the next invoice.",
    )

    @field_validator("amount_usd")
    @classmethod
    def _not_zero(cls, value: Decimal) -> Decimal:
        if value == 0:
            raise ValueError("must not be zero")
        return value


class AdjustmentOut(BaseModel):
    id: str = Field(description="The adjustment's ledger row (`request_id` in usage events).")
    account_id: uuid.UUID
    amount_usd: DecimalString
    reason: str
    occurred_at: datetime
    recorded_at: datetime
    period: str = Field(description="The month of `occurred_at`, `YYYY-MM` (UTC).")
