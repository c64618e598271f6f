"""Every query of credits: the grants of an account, one grant locked, and what was bought."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection

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


# A grant's columns, read on a plain connection (the proxy's) as well as in a session.
_GRANT_COLUMNS = (
    CreditGrant.id,
    CreditGrant.account_id,
    CreditGrant.kind,
    CreditGrant.amount_usd,
    CreditGrant.priority,
    CreditGrant.expires_at,
    CreditGrant.reference,
    CreditGrant.created_at,
    CreditGrant.voided_at,
)


async def grants_of(connection: AsyncConnection, account_id: uuid.UUID) -> Sequence[Any]:
    """All of an account's grants, voided and expired ones too, oldest first (rows with the
    columns of `CreditGrant`)."""
    statement = (
        select(*_GRANT_COLUMNS)
        .where(CreditGrant.account_id == account_id)
        .order_by(CreditGrant.created_at, CreditGrant.id)
    )
    return (await connection.execute(statement)).all()
