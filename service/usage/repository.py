"""Usage queries: aggregation and raw rows, all in SQL over the partitioned ledger.

Every query bounds `occurred_at` when the caller does and filters `account_id` when known,
so Postgres prunes the monthly partitions and walks the (account_id, occurred_at) index.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Date, Select, cast, func, literal, select, tuple_
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.elements import ColumnElement

from service.db.models import ApiKey, UsageRecord
from service.usage.schemas import GroupBy

L = UsageRecord


def _utc(column: Any) -> Any:
    return func.timezone("UTC", column)


# group_by name → (output field, SQL expression).
GROUP_EXPRESSIONS: dict[GroupBy, tuple[str, Any]] = {
    "day": ("day", cast(_utc(L.occurred_at), Date)),
    "month": ("month", func.to_char(_utc(L.occurred_at), literal("YYYY-MM"))),
    "model": ("model", L.requested_model),
    "key": ("key_id", L.key_id),
    "task": ("task_id", L.task_id),
    "task_type": ("task_type", L.task_type),
    "provider": ("provider", L.provider),
    "status": ("status_code", L.status_code),
}

TOTALS = (
    func.count().label("requests"),
    func.coalesce(func.sum(L.prompt_tokens), 0).label("prompt_tokens"),
    func.coalesce(func.sum(L.completion_tokens), 0).label("completion_tokens"),
    func.coalesce(func.sum(L.total_tokens), 0).label("total_tokens"),
    func.coalesce(func.sum(L.cached_tokens), 0).label("cached_tokens"),
    func.coalesce(func.sum(L.reasoning_tokens), 0).label("reasoning_tokens"),
    # NUMERIC sum: exact. Unpriced rows (NULL cost) add nothing and are counted apart.
    func.coalesce(func.sum(L.cost_usd), 0).label("cost_usd"),
    func.count().filter(L.cost_usd.is_(None)).label("unpriced_requests"),
)


@dataclass(frozen=True, slots=True)
class UsageFilter:
    account_id: uuid.UUID | None = None
    key_id: uuid.UUID | None = None
    task_id: str | None = None
    model: str | None = None
    start: datetime | None = None
    end: datetime | None = None

    def conditions(self) -> list[ColumnElement[bool]]:
        conditions: list[ColumnElement[bool]] = []
        if self.account_id is not None:
            conditions.append(L.account_id == self.account_id)
        if self.key_id is not None:
            conditions.append(L.key_id == self.key_id)
        if self.task_id is not None:
            conditions.append(L.task_id == self.task_id)
        if self.model is not None:
            conditions.append(L.requested_model == self.model)
        if self.start is not None:
            conditions.append(L.occurred_at >= self.start)
        if self.end is not None:
            conditions.append(L.occurred_at < self.end)
        return conditions


class UsageRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def key_account(self, key_id: uuid.UUID) -> uuid.UUID | None:
        return await self.session.scalar(select(ApiKey.account_id).where(ApiKey.id == key_id))

    async def aggregate(
        self, where: UsageFilter, group_by: Sequence[GroupBy], limit: int
    ) -> Sequence[Row[Any]]:
        """One row per group (one row in all without groups), ordered by the groups."""
        columns = [GROUP_EXPRESSIONS[g][1].label(GROUP_EXPRESSIONS[g][0]) for g in group_by]
        statement: Select[Any] = select(*columns, *TOTALS).where(*where.conditions())
        if columns:
            positions = range(1, len(columns) + 1)
            statement = (
                statement.group_by(*(literal(p, literal_execute=True) for p in positions))
                .order_by(*(literal(p, literal_execute=True) for p in positions))
                .limit(limit + 1)
            )
        rows: Sequence[Row[Any]] = (await self.session.execute(statement)).all()
        return rows

    async def events(
        self, where: UsageFilter, limit: int, after: tuple[datetime, str] | None
    ) -> Sequence[UsageRecord]:
        """Ledger rows in (occurred_at, request_id) order, strictly after `after`."""
        statement = select(L).where(*where.conditions())
        if after is not None:
            at, request_id = after
            # The plain bound lets the index range scan start at the cursor; the row
            # comparison breaks ties between rows of the same instant.
            statement = statement.where(
                L.occurred_at >= at, tuple_(L.occurred_at, L.request_id) > tuple_(at, request_id)
            )
        statement = statement.order_by(L.occurred_at, L.request_id).limit(limit + 1)
        return (await self.session.scalars(statement)).all()
