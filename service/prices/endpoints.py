from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Query, Response, status

from service.db.session import after_commit
from service.deps import Admin, Caller, Prices, Session
from service.errors import API_ERRORS, errors
from service.prices import service
from service.prices.schemas import PriceCreate, PriceList, PriceOut
from service.schemas import Text, UTCTime, links

router = APIRouter(prefix="/billing", tags=["prices"], responses=errors(*API_ERRORS))

LOOKUP = {"query.model": "$response.body#/model", "query.at": "$response.body#/effective_from"}


@router.get("/prices", response_model=PriceList)
async def list_prices(
    session: Session,
    _: Caller,
    model: Annotated[
        Text | None, Query(max_length=256, description="Versions of this exact id or pattern.")
    ] = None,
    at: Annotated[
        UTCTime | None, Query(description="Only the versions in force at this instant.")
    ] = None,
    current: Annotated[bool, Query(description="Only the versions in force now.")] = False,
) -> PriceList:
    """Price versions, USD per 1M tokens (any caller may read them)."""
    if current and at is None:
        at = datetime.now(UTC)
    versions = await service.list_prices(session, model, at)
    return PriceList(data=[PriceOut.model_validate(v) for v in versions])


@router.get(
    "/prices/lookup",
    response_model=PriceOut,
    responses=errors(*API_ERRORS, service.UnpricedModel),
)
async def lookup_price(
    session: Session,
    _: Caller,
    model: Annotated[Text, Query(min_length=1, max_length=256, description="A model id.")],
    at: Annotated[UTCTime | None, Query(description="Default now.")] = None,
) -> PriceOut:
    """The version that prices a model at an instant (exact id first, then glob patterns)."""
    version = await service.lookup(session, model, at or datetime.now(UTC))
    return PriceOut.model_validate(version)


@router.post(
    "/prices",
    response_model=PriceOut,
    status_code=status.HTTP_201_CREATED,
    responses={
        200: {"model": PriceOut, "description": "The same version existed already."},
        201: links(
            ListVersions=("GET", "/billing/prices", {"query.model": "$response.body#/model"}),
            LookupPrice=("GET", "/billing/prices/lookup", LOOKUP),
        ),
        **errors(*API_ERRORS, service.PriceVersionExists),
    },
)
async def add_price(
    data: PriceCreate, session: Session, response: Response, prices: Prices, _: Admin
) -> PriceOut:
    """Add a price version (admin). Past rows and finalized invoices never change."""
    version, created = await service.add_price(session, data)
    out = PriceOut.model_validate(version)
    # Durable first, then this worker prices with it at once; the others pick it up
    # within their refresh interval.
    after_commit(session, prices.refresh)
    if not created:
        response.status_code = status.HTTP_200_OK
    return out
