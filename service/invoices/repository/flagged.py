"""The flagged usage an invoice bills that no admin has reviewed: it blocks finalization."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import and_, func, or_, select

from service.db.models import FlaggedUsageReview, Invoice, UsageRecord
from service.db.repository import Repository

L = UsageRecord
R = FlaggedUsageReview

# A flagged ledger row and its review (if any): the review carries the row's key.
REVIEW_JOIN = and_(R.request_id == L.request_id, R.occurred_at == L.occurred_at)


class UnreviewedUsageRepository(Repository):
    async def unreviewed_billed_by(
        self, account_id: uuid.UUID, start: datetime, end: datetime, limit: int
    ) -> tuple[list[str], int]:
        """Unreviewed flagged rows the account's invoice of [start, end) bills: its own
        month's, and late ones of months already finalized. (A few ids, and how many.)"""
        finalized = select(Invoice.period).where(
            Invoice.account_id == account_id, Invoice.status == "finalized"
        )
        month = func.to_char(func.timezone("UTC", L.occurred_at), "YYYY-MM")
        where = and_(
            L.account_id == account_id,
            L.usage_flag.is_not(None),
            L.occurred_at < end,
            or_(L.occurred_at >= start, month.in_(finalized)),
            R.request_id.is_(None),
        )
        ids = await self.session.scalars(
            select(L.request_id)
            .outerjoin(R, REVIEW_JOIN)
            .where(where)
            .order_by(L.occurred_at, L.request_id)
            .limit(limit)
        )
        count = await self.session.scalar(
            select(func.count()).select_from(L).outerjoin(R, REVIEW_JOIN).where(where)
        )
        return list(ids), int(count or 0)
