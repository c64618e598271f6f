"""Every query of quotes, and the history they learn from.

The history of one account's tasks of a type on a model is read in two short steps, never
by scanning every past task: the rollup `task_cost_rollup` (kept by a trigger on `tasks`)
gives per cost bucket the count and cost sum over the look-back window — enough for the
sample size, the mean and the bucket holding the quantile — and then one walk of that
bucket in cost order through `ix_tasks_cost_history` reads the exact quantile cost.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from sqlalchemy import select, text, update

from pricing.quote import BucketPosition
from service.db.models import Account, Quote, Task
from service.db.repository import Repository


@dataclass(frozen=True, slots=True)
class CostHistogram:
    buckets: list[tuple[int, int]]  # (cost bucket, tasks), cheapest bucket first
    sample_size: int
    total_cost: Decimal


class QuoteRepository(Repository):
    async def account(self, account_id: uuid.UUID) -> Account | None:
        return await self.session.get(Account, account_id)

    async def cost_histogram(
        self, account_id: uuid.UUID, task_type: str, model: str, since: datetime
    ) -> CostHistogram:
        rows = (
            await self.session.execute(
                text(
                    "SELECT cost_bucket, sum(tasks)::bigint AS tasks, sum(cost_usd) AS cost"
                    " FROM task_cost_rollup"
                    " WHERE account_id = :a AND task_type = :t AND model = :m"
                    " AND completed_on >= :since"
                    " GROUP BY cost_bucket HAVING sum(tasks) > 0 ORDER BY cost_bucket"
                ),
                {"a": account_id, "t": task_type, "m": model, "since": since.date()},
            )
        ).all()
        buckets = [(row.cost_bucket, int(row.tasks)) for row in rows]
        total = sum((row.cost for row in rows), Decimal(0))
        return CostHistogram(buckets, sum(n for _, n in buckets), total)

    async def cost_at(
        self,
        account_id: uuid.UUID,
        task_type: str,
        model: str,
        since: datetime,
        position: BucketPosition,
    ) -> Decimal | None:
        """The exact cost at `position`, walking its bucket from the nearer end."""
        ascending = position.rank_in_bucket <= position.rank_from_top
        offset = (position.rank_in_bucket if ascending else position.rank_from_top) - 1
        direction = "ASC" if ascending else "DESC"
        value: Decimal | None = await self.session.scalar(
            text(
                "SELECT completed_cost_usd FROM tasks"
                " WHERE account_id = :a AND task_type = :t AND model = :m"
                " AND cost_bucket = :b AND completed_cost_usd IS NOT NULL"
                " AND completed_at >= :since"
                f" ORDER BY completed_cost_usd {direction} OFFSET :offset LIMIT 1"
            ),
            {
                "a": account_id,
                "t": task_type,
                "m": model,
                "b": position.bucket,
                "since": since,
                "offset": offset,
            },
        )
        return value

    async def add(self, quote: Quote) -> Quote:
        self.session.add(quote)
        await self.session.flush()
        await self.session.refresh(quote)
        return quote

    async def get(self, quote_id: uuid.UUID, *, for_update: bool = False) -> Quote | None:
        statement = select(Quote).where(Quote.id == quote_id)
        if for_update:
            statement = statement.with_for_update()
        quote: Quote | None = await self.session.scalar(statement)
        return quote

    async def task_of(self, quote_id: uuid.UUID) -> str | None:
        external_id: str | None = await self.session.scalar(
            select(Task.external_id).where(Task.quote_id == quote_id)
        )
        return external_id

    async def mark_accepted(self, quote: Quote, at: datetime) -> None:
        await self.session.execute(update(Quote).where(Quote.id == quote.id).values(accepted_at=at))
        await self.session.refresh(quote)
