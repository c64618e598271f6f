"""Quoted tasks as invoices bill them.

A quoted task covers the rows under its id that occurred from its acceptance on: they are
never billed as tokens. It is billed as a task (`billable_tasks`); when that is at cost, its
rows recorded up to the cutoff of its first finalized invoice are in its task line
(`task_cost_usage`), and each later one is billed once, by the invoice whose usage window
holds it (`late_task_sums`).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import any_, bindparam, func, select, update

from pricing.prices import PriceSegment
from service.db.models import Task
from service.db.repository import Repository
from service.invoices.repository.sums import (
    UUIDS,
    L,
    UsageSum,
    completion_period,
    covers,
    in_segment,
    measures,
    segment_table,
    totals_of,
)


@dataclass(frozen=True, slots=True)
class BillableTask:
    """A completed quoted task that no finalized invoice bills yet."""

    id: uuid.UUID
    account_id: uuid.UUID
    period: str  # the month it completed (or expired) in
    outcome: str
    billed_as: str
    task_type: str | None
    model: str | None
    fixed_price_usd: Decimal | None


class TaskBillingRepository(Repository):
    async def billable_tasks(
        self, account_ids: Sequence[uuid.UUID], before: datetime
    ) -> list[BillableTask]:
        """Completed quoted tasks no finalized invoice bills, completed before `before`
        (the caller keeps those of its period and of the earlier finalized months)."""
        period = completion_period(Task.completed_at)
        rows = await self.session.execute(
            select(
                Task.id,
                Task.account_id,
                period.label("period"),
                Task.status,
                Task.billed_as,
                Task.task_type,
                Task.model,
                Task.fixed_price_usd,
            ).where(
                Task.account_id == any_(bindparam("accounts", list(account_ids), type_=UUIDS)),
                Task.quote_id.is_not(None),
                Task.status != "open",
                Task.billed_invoice_id.is_(None),
                Task.completed_at < before,
            )
        )
        return [
            BillableTask(
                r.id,
                r.account_id,
                r.period,
                r.status,
                r.billed_as,
                r.task_type,
                r.model,
                r.fixed_price_usd,
            )
            for r in rows
        ]

    async def task_cost_usage(
        self,
        task_ids: Sequence[uuid.UUID],
        cutoff: datetime,
        segments: dict[str, list[PriceSegment]] | None = None,
    ) -> list[UsageSum]:
        """The rows tasks billed at cost cover, for their task lines: those recorded up to the
        cutoff of the task's first finalized invoice (kept through voids), else up to
        `cutoff`; per (completion period, outcome, task type, task model) and model and
        version (or span of the model's price timeline, for rows stored without a price)."""
        if not task_ids or (segments is not None and not segments):
            return []
        source = L.__table__.join(Task.__table__, covers(L))
        where = [
            Task.id == any_(bindparam("tasks", list(task_ids), type_=UUIDS)),
            L.recorded_at <= func.coalesce(Task.billed_rows_until, cutoff),
        ]
        period = completion_period(Task.completed_at).label("period")
        keys: list[Any] = [L.account_id, period, Task.status, Task.task_type, Task.model]
        keys.append(L.requested_model)
        if segments is not None:
            seg = segment_table(segments)
            source = source.join(seg, in_segment(L, seg))
            where.append(L.cost_usd.is_(None))
            keys.append(seg.c.segment)
        else:
            keys += [L.price_version_id, L.cost_usd.is_(None).label("unpriced")]
        rows = await self.session.execute(
            select(*keys, *measures(L)).select_from(source).where(*where).group_by(*keys)
        )
        sums = []
        for r in rows:
            unpriced = segments is not None or bool(r.unpriced)
            sums.append(
                UsageSum(
                    r.account_id,
                    (r.period, r.status, r.task_type, r.model),
                    "usage",
                    r.requested_model,
                    None if segments is not None else r.price_version_id,
                    unpriced,
                    totals_of(r),
                    None if unpriced else r.cost_usd,
                    int(r.segment) if segments is not None else None,
                )
            )
        return sums

    async def mark_tasks_billed(
        self, invoice_id: uuid.UUID, task_ids: Sequence[uuid.UUID], cutoff: datetime
    ) -> None:
        """The finalized invoice bills these tasks; the first billing's cutoff stays."""
        if not task_ids:
            return
        await self.session.execute(
            update(Task)
            .where(Task.id == any_(bindparam("tasks", list(task_ids), type_=UUIDS)))
            .values(
                billed_invoice_id=invoice_id,
                billed_rows_until=func.coalesce(Task.billed_rows_until, cutoff),
            )
        )

    async def release_tasks(self, invoice_id: uuid.UUID) -> None:
        """A voided invoice bills nothing: its tasks go on the next invoice of their month."""
        await self.session.execute(
            update(Task).where(Task.billed_invoice_id == invoice_id).values(billed_invoice_id=None)
        )
