"""Accounts and their API keys."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession

from service.accounts.repository import AccountRepository
from service.accounts.schemas import AccountCreate, KeyCreated, KeyOut
from service.auth.keys import generate_key
from service.db.models import Account, ApiKey
from service.errors import NotFound


async def create_account(session: AsyncSession, data: AccountCreate) -> Account:
    account = Account(name=data.name, tier=data.tier, monthly_budget_usd=data.monthly_budget_usd)
    await AccountRepository(session).add(account)
    return account


async def create_key(
    session: AsyncSession,
    account_id: uuid.UUID,
    name: str | None = None,
    expires_at: datetime | None = None,
) -> KeyCreated:
    repository = AccountRepository(session)
    if await repository.get_account(account_id) is None:
        raise NotFound(f"account {account_id} not found", param="account_id")
    new = generate_key()
    key = ApiKey(
        account_id=account_id,
        name=name,
        prefix=new.prefix,
        key_hash=new.key_hash,
        expires_at=expires_at,
    )
    await repository.add(key)
    return KeyCreated(**KeyOut.model_validate(key).model_dump(), key=new.plaintext)
