from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, status

from service.db.session import after_commit
from service.deps import Admin, Prices, Session
from service.errors import API_ERRORS, errors
from service.rate_cards import service
from service.rate_cards.schemas import (
    RateCardCreate,
    RateCardList,
    RateCardOut,
    RateCardVersionCreate,
)
from service.schemas import links

CardId = Annotated[int, Path(ge=1, le=2**63 - 1)]

router = APIRouter(prefix="/billing", tags=["rate cards"], responses=errors(*API_ERRORS))

CARD = {"path.rate_card_id": "$response.body#/id"}


@router.get("/rate-cards", response_model=RateCardList)
async def list_rate_cards(session: Session, _: Admin) -> RateCardList:
    """Every rate card with its versions (admin: they show the operator's terms)."""
    return RateCardList(data=await service.list_rate_cards(session))


@router.post(
    "/rate-cards",
    response_model=RateCardOut,
    status_code=status.HTTP_201_CREATED,
    responses={
        201: links(
            GetRateCard=("GET", "/billing/rate-cards/{rate_card_id}", CARD),
            AddVersion=("POST", "/billing/rate-cards/{rate_card_id}/versions", CARD),
        ),
        **errors(*API_ERRORS, service.RateCardExists, service.RateCardVersionExists),
    },
)
async def create_rate_card(
    data: RateCardCreate, session: Session, prices: Prices, _: Admin
) -> RateCardOut:
    """Create a rate card with its first version (admin)."""
    card = await service.create_rate_card(session, data)
    after_commit(session, prices.refresh)
    return card


@router.get("/rate-cards/{rate_card_id}", response_model=RateCardOut)
async def get_rate_card(rate_card_id: CardId, session: Session, _: Admin) -> RateCardOut:
    """One rate card with its versions, oldest first (admin)."""
    return await service.get_rate_card(session, rate_card_id)


@router.post(
    "/rate-cards/{rate_card_id}/versions",
    response_model=RateCardOut,
    status_code=status.HTTP_201_CREATED,
    responses=errors(*API_ERRORS, service.RateCardVersionExists),
)
async def add_rate_card_version(
    rate_card_id: CardId, data: RateCardVersionCreate, session: Session, prices: Prices, _: Admin
) -> RateCardOut:
    """New terms from `effective_from` on (admin). Stored ledger rows and finalized
    invoices never change; rows stored unpriced are priced on the next draft by the terms
    in force at their time."""
    card = await service.add_version(session, rate_card_id, data)
    after_commit(session, prices.refresh)
    return card
