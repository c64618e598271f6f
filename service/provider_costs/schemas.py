from __future__ import annotations

from pydantic import BaseModel, Field

from service.prices.schemas import PriceCreate, PriceOut
from service.schemas import Text

ProviderName = Text


class ProviderCostCreate(PriceCreate):
    """What `provider` charges the operator for `model`, USD per 1M tokens."""

    provider: ProviderName = Field(
        min_length=1,
        max_length=64,
        description="The provider's name, as in the providers file.",
        examples=["hyperbolic"],
    )


class ProviderCostOut(PriceOut):
    provider: str


class ProviderCostList(BaseModel):
    data: list[ProviderCostOut]
