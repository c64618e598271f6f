from __future__ import annotations

import uuid

from sqlalchemy.ext.asyncio import AsyncSession

from service.db.models import Account, ApiKey


class AccountRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def add(self, obj: Account | ApiKey) -> None:
        self.session.add(obj)
        await self.session.flush()
        await self.session.refresh(obj)

    async def get_account(self, account_id: uuid.UUID) -> Account | None:
        return await self.session.get(Account, account_id)
