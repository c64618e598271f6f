"""Every query of credits beside the grants the balance reads (service/limits/repository.py):
a grant added or locked, and what an account bought."""

from __future__ import annotations

import uuid
from decimal import Decimal

from sqlalchemy import func, select

from service.db.models import CreditGrant, CreditKind
from service.db.repository import Repository


class CreditRepository(Repository):
    async def add(self, grant: CreditGrant) -> None:
        self.session.add(grant)
        await self.session.flush()
        await self.session.refresh(grant)

    async def lock_grant(self, grant_id: uuid.UUID) -> CreditGrant | None:
        statement = select(CreditGrant).where(CreditGrant.id == grant_id).with_for_update()
        return (await self.session.scalars(statement)).first()

    async def purchased_usd(self, account_id: uuid.UUID) -> Decimal:
        """Every credit the account bought, spent or not (a void takes back none of it)."""
        statement = select(func.coalesce(func.sum(CreditGrant.amount_usd), 0)).where(
            CreditGrant.account_id == account_id, CreditGrant.kind == CreditKind.PURCHASE
        )
        return Decimal((await self.session.execute(statement)).scalar_one())
