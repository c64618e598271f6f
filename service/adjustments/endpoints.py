from __future__ import annotations

import uuid

from fastapi import APIRouter, status
from sqlalchemy.ext.asyncio import AsyncSession

from service.accounts.service import get_account
from service.adjustments import service
from service.adjustments.schemas import AdjustmentCreate, AdjustmentOut
from service.deps import Admin, Session
from service.errors import API_ERRORS, errors
from service.idempotency.service import IdempotencyKeyHeader, IdempotencyKeyReused, idempotent

router = APIRouter(prefix="/billing", tags=["accounts"], responses=errors(*API_ERRORS))

SCOPE = "POST /billing/accounts/{account_id}/adjustments"


@router.post(
    "/accounts/{account_id}/adjustments",
    status_code=status.HTTP_201_CREATED,
    response_model=AdjustmentOut,
    responses=errors(*API_ERRORS, IdempotencyKeyReused),
)
async def create_adjustment(
    account_id: uuid.UUID,
    data: AdjustmentCreate,
    session: Session,
    admin: Admin,
    idempotency_key: IdempotencyKeyHeader = None,
) -> AdjustmentOut:
    """Charge (positive) or credit (negative) an account an exact amount (admin).

    An append-only ledger row of kind `adjustment` in the month of `occurred_at`: on that
    month's invoice, or as late usage on the next one when that month is finalized already.
    With `Idempotency-Key`, a retry answers the first result and adds nothing.
    """
    await get_account(session, admin, account_id)
    return await adjust_once(session, account_id, data, idempotency_key)


async def adjust_once(
    session: AsyncSession, account_id: uuid.UUID, data: AdjustmentCreate, key: str | None
) -> AdjustmentOut:
    """The adjustment, once per idempotency key: the API's and the console's one way."""

    async def adjust() -> AdjustmentOut:
        return await service.adjust_account(session, account_id, data)

    request = {"account_id": str(account_id), "body": data.model_dump(mode="json")}
    return await idempotent(session, SCOPE, key, request, adjust, AdjustmentOut)
