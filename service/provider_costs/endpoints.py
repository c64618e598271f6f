from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response, status

from service.db.session import after_commit
from service.deps import Admin, Prices, Session
from service.errors import API_ERRORS, errors
from service.prices.service import PriceVersionExists
from service.provider_costs import service
from service.provider_costs.schemas import ProviderCostCreate, ProviderCostList, ProviderCostOut
from service.schemas import Text

router = APIRouter(prefix="/billing", tags=["provider costs"], responses=errors(*API_ERRORS))


@router.get("/provider-costs", response_model=ProviderCostList)
async def list_provider_costs(
    session: Session,
    _: Admin,
    provider: Annotated[Text | None, Query(max_length=64)] = None,
    model: Annotated[
        Text | None, Query(max_length=256, description="Versions of this exact id or pattern.")
    ] = None,
) -> ProviderCostList:
    """What each upstream charges the operator, USD per 1M tokens (admin: they are the
    operator's costs, never a customer's business)."""
    versions = await service.list_costs(session, provider, model)
    return ProviderCostList(data=[ProviderCostOut.model_validate(v) for v in versions])


@router.post(
    "/provider-costs",
    response_model=ProviderCostOut,
    status_code=status.HTTP_201_CREATED,
    responses={
        200: {"model": ProviderCostOut, "description": "The same version existed already."},
        **errors(*API_ERRORS, PriceVersionExists),
    },
)
async def add_provider_cost(
    data: ProviderCostCreate, session: Session, response: Response, prices: Prices, _: Admin
) -> ProviderCostOut:
    """Add a provider-cost version (admin). Stored ledger rows never change: a row keeps
    the provider cost (or unknown) it was written with."""
    version, created = await service.add_cost(session, data)
    out = ProviderCostOut.model_validate(version)
    after_commit(session, prices.refresh)
    if not created:
        response.status_code = status.HTTP_200_OK
    return out
