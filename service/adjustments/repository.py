"""The one write of an adjustment: its ledger row and the row that says why."""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal

from sqlalchemy import func, insert, literal, select

from service.db.models import Adjustment, UsageRecord
from service.db.repository import Repository
from service.ledger.record import LedgerKind, UsageSource


class AdjustmentRepository(Repository):
    async def add(
        self,
        request_id: str,
        account_id: uuid.UUID,
        occurred_at: datetime,
        amount_usd: Decimal,
        reason: str,
        model: str,
        endpoint: str,
    ) -> datetime:
        """An adjustment row of the ledger (no tokens, the amount as its exact cost) and its
        reason; the instant the ledger row was recorded."""
        await self.session.execute(
            select(func.meterline_ensure_usage_partition(literal(occurred_at)))
        )
        recorded_at: datetime = (
            await self.session.execute(
                insert(UsageRecord)
                .values(
                    request_id=request_id,
                    occurred_at=occurred_at,
                    kind=LedgerKind.ADJUSTMENT,
                    account_id=account_id,
                    endpoint=endpoint,
                    requested_model=model,
                    stream=False,
                    status_code=200,
                    prompt_tokens=0,
                    completion_tokens=0,
                    total_tokens=0,
                    cached_tokens=0,
                    reasoning_tokens=0,
                    usage_source=UsageSource.NONE,
                    cost_usd=amount_usd,
                )
                .returning(UsageRecord.recorded_at)
            )
        ).scalar_one()
        await self.session.execute(
            insert(Adjustment).values(
                request_id=request_id,
                occurred_at=occurred_at,
                account_id=account_id,
                reason=reason,
            )
        )
        return recorded_at

    async def of_account(
        self, account_id: uuid.UUID, start: datetime, end: datetime
    ) -> list[tuple[Adjustment, Decimal, datetime]]:
        """The account's adjustments that occurred in [start, end), oldest first, each with
        its amount and when its ledger row was recorded."""
        statement = (
            select(Adjustment, UsageRecord.cost_usd, UsageRecord.recorded_at)
            .join(
                UsageRecord,
                (UsageRecord.request_id == Adjustment.request_id)
                & (UsageRecord.occurred_at == Adjustment.occurred_at),
            )
            .where(
                Adjustment.account_id == account_id,
                Adjustment.occurred_at >= start,
                Adjustment.occurred_at < end,
            )
            .order_by(Adjustment.occurred_at, Adjustment.request_id)
        )
        rows = (await self.session.execute(statement)).all()
        return [(row[0], row[1] or Decimal(0), row[2]) for row in rows]
