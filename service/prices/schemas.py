from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, field_validator

from service.schemas import Billable, DecimalString, Text, as_utc

# NUMERIC(18, 6): more decimals would be rounded by the database, so they are refused.
Rate = Annotated[Decimal, Field(ge=0, max_digits=18, decimal_places=6)]
# A price's start says its offset (an instant, not a wall-clock time), within what is billed.
EffectiveFrom = Annotated[AwareDatetime, AfterValidator(as_utc), Billable]


class ModelRates(BaseModel):
    """USD per 1M tokens for a model (an exact id or a glob)."""

    model_config = ConfigDict(extra="forbid")

    model: Text = Field(
        min_length=1,
        max_length=256,
        description="An exact model id, or a glob pattern (`meta-llama/*`), without leading or"
        " trailing spaces. An exact id wins over patterns; among patterns the longest"
        " matching one wins.",
        examples=["meta-llama/Llama-3.3-70B-Instruct", "deepseek-ai/*"],
    )
    input_usd_per_mtok: Rate = Field(description="USD per 1,000,000 prompt tokens.")
    output_usd_per_mtok: Rate = Field(description="USD per 1,000,000 completion tokens.")
    cached_input_usd_per_mtok: Rate | None = Field(
        default=None, description="USD per 1M cached prompt tokens; unset: the input price."
    )

    @field_validator("model")
    @classmethod
    def _unpadded(cls, value: str) -> str:
        if value != value.strip():
            raise ValueError("must not start or end with whitespace")
        return value


class PriceCreate(ModelRates):
    effective_from: EffectiveFrom | None = Field(
        default=None,
        description="When the price takes effect (RFC 3339 with an offset, from 1970-01-01 to"
        " 9999-11-30 UTC); default now. A past instant"
        " never changes a ledger row already priced or a finalized invoice: it prices rows"
        " stored without a price (on drafts, by the version in force at each row's time) and"
        " rows written from now on.",
    )


class PriceOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    model: str
    input_usd_per_mtok: DecimalString
    output_usd_per_mtok: DecimalString
    cached_input_usd_per_mtok: DecimalString | None
    effective_from: datetime
    source: str
    created_at: datetime


class PriceList(BaseModel):
    data: list[PriceOut]
