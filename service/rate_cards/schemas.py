from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pricing.rate_cards import MAX_MARKUP_PCT, MIN_MARKUP_PCT, MarkupBasis
from service.prices.schemas import EffectiveFrom, ModelRates
from service.schemas import DecimalString, Text

# NUMERIC(9, 4); below -100 % a price would be negative.
MarkupPct = Annotated[
    Decimal, Field(ge=MIN_MARKUP_PCT, le=MAX_MARKUP_PCT, max_digits=9, decimal_places=4)
]
MAX_RATES = 1000
# A BIGINT identity: larger ids cannot exist (and Postgres would refuse to compare them).
RateCardId = Annotated[int, Field(ge=1, le=2**63 - 1)]


class RateCardVersionCreate(BaseModel):
    """A rate card's terms from `effective_from` on, until its next version starts."""

    model_config = ConfigDict(extra="forbid")

    effective_from: EffectiveFrom | None = Field(
        default=None,
        description="When these terms take effect (RFC 3339 with an offset); default now. A"
        " past instant never changes a ledger row already priced or a finalized invoice.",
    )
    markup_pct: MarkupPct = Field(
        default=Decimal(0),
        description="Percent added to the basis (25 = +25 %; -100 = free; not below -100).",
        examples=["25"],
    )
    markup_basis: MarkupBasis = Field(
        default=MarkupBasis.LIST_PRICE,
        description="What the markup applies to: `list_price` (the price table) or"
        " `provider_cost` (what the upstream charges; a model without a known provider cost"
        " is then unpriced unless an explicit rate covers it).",
    )
    rates: list[ModelRates] = Field(
        default_factory=list,
        max_length=MAX_RATES,
        description="Explicit rates per model (exact id or glob): they win over the markup.",
    )

    @field_validator("rates")
    @classmethod
    def _one_rate_per_model(cls, rates: list[ModelRates]) -> list[ModelRates]:
        models = [r.model for r in rates]
        if len(set(models)) != len(models):
            raise ValueError("each model may have one explicit rate")
        return rates


class RateCardCreate(RateCardVersionCreate):
    """A new rate card with its first version."""

    name: Text = Field(min_length=1, max_length=200, examples=["resellers-25"])
    description: Text | None = Field(default=None, max_length=2000)


class RateOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    model: str
    input_usd_per_mtok: DecimalString
    output_usd_per_mtok: DecimalString
    cached_input_usd_per_mtok: DecimalString | None


class RateCardVersionOut(BaseModel):
    id: int
    rate_card_id: int
    effective_from: datetime
    markup_pct: DecimalString
    markup_basis: MarkupBasis
    rates: list[RateOut]
    created_at: datetime


class RateCardOut(BaseModel):
    id: int
    name: str
    description: str | None
    created_at: datetime
    versions: list[RateCardVersionOut] = Field(description="Oldest first.")


class RateCardList(BaseModel):
    data: list[RateCardOut]


class RateCardAssignmentOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    account_id: uuid.UUID
    rate_card_id: int | None = Field(description="None: list prices from then on.")
    effective_from: datetime
    created_at: datetime


class RateCardAssignmentList(BaseModel):
    data: list[RateCardAssignmentOut] = Field(description="Oldest first.")
