"""Queries of the review reports: flagged ledger rows and their reviews, quarantined rows."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import select, tuple_
from sqlalchemy.dialects.postgresql import insert as pg_insert

from service.db.models import FlaggedUsageReview, QuarantinedUsage, UsageRecord
from service.db.repository import Repository, readable
from service.invoices.repository.flagged import REVIEW_JOIN

L = UsageRecord
R = FlaggedUsageReview
Q = QuarantinedUsage


class ReviewRepository(Repository):
    async def flagged(
        self,
        start: datetime,
        end: datetime,
        account_id: uuid.UUID | None,
        unreviewed_only: bool,
        limit: int,
        after: tuple[datetime, str] | None,
    ) -> Sequence[tuple[UsageRecord, FlaggedUsageReview | None]]:
        """Flagged rows that occurred in [start, end), oldest first, with their review."""
        query = readable(
            select(L, R)
            .outerjoin(R, REVIEW_JOIN)
            .where(L.usage_flag.is_not(None), L.occurred_at >= start, L.occurred_at < end)
            .order_by(L.occurred_at, L.request_id)
            .limit(limit),
            L.account_id,
            account_id,
        )
        if unreviewed_only:
            query = query.where(R.request_id.is_(None))
        if after is not None:
            query = query.where(tuple_(L.occurred_at, L.request_id) > tuple_(*after))
        return (await self.session.execute(query)).all()

    async def flagged_row(
        self, request_id: str
    ) -> tuple[UsageRecord, FlaggedUsageReview | None] | None:
        query = (
            select(L, R)
            .outerjoin(R, REVIEW_JOIN)
            .where(L.request_id == request_id, L.usage_flag.is_not(None))
        )
        return (await self.session.execute(query)).first()

    async def add_review(
        self, row: UsageRecord, decision: str, note: str | None, adjustment: str | None = None
    ) -> FlaggedUsageReview | None:
        """The new review, or None when the row was reviewed already (by a concurrent call)."""
        added = await self.session.scalars(
            pg_insert(R)
            .values(
                request_id=row.request_id,
                occurred_at=row.occurred_at,
                account_id=row.account_id,
                decision=decision,
                adjustment_request_id=adjustment,
                note=note,
            )
            .on_conflict_do_nothing()
            .returning(R)
        )
        return added.first()

    async def quarantined(
        self, account_id: uuid.UUID | None, limit: int, after: tuple[datetime, str] | None
    ) -> Sequence[QuarantinedUsage]:
        query = readable(
            select(Q).order_by(Q.quarantined_at, Q.request_id).limit(limit),
            Q.account_id,
            account_id,
        )
        if after is not None:
            query = query.where(tuple_(Q.quarantined_at, Q.request_id) > tuple_(*after))
        return (await self.session.scalars(query)).all()
