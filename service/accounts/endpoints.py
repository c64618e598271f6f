from __future__ import annotations

import uuid

from fastapi import APIRouter, status

from service.accounts import service
from service.accounts.schemas import AccountCreate, AccountOut, KeyCreate, KeyCreated
from service.auth.principal import Admin
from service.db.session import Session
from service.errors import ErrorBody

router = APIRouter(
    prefix="/billing",
    tags=["accounts"],
    responses={401: {"model": ErrorBody}, 404: {"model": ErrorBody}, 422: {"model": ErrorBody}},
)


@router.post("/accounts", status_code=status.HTTP_201_CREATED, response_model=AccountOut)
async def create_account(data: AccountCreate, session: Session, _: Admin) -> AccountOut:
    account = await service.create_account(session, data)
    return AccountOut.model_validate(account)


@router.post(
    "/accounts/{account_id}/keys", status_code=status.HTTP_201_CREATED, response_model=KeyCreated
)
async def create_key(
    account_id: uuid.UUID, data: KeyCreate, session: Session, _: Admin
) -> KeyCreated:
    return await service.create_key(session, account_id, data.name, data.expires_at)
