"""Expiry of open quoted tasks past their deadline, and the background job that runs it.

A quoted task gets its deadline (`expires_at`) when its quote is accepted. Past it, an
open task is closed as `expired`, dated at the deadline, and billed by the account's
`expired_task_policy`. Invoices expire their accounts' due tasks before they are computed,
and every `interval` seconds the background job expires every account's (skipping tasks
another transaction holds that round): a bill never depends on when the job last ran.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from pricing.invoice import ExpiredTaskPolicy, FailedTaskPolicy, TaskOutcome, task_billing
from service.db.engine import transaction
from service.lifecycle import Periodic
from service.parts import LiveTasks
from service.tasks.completion import raise_completed, task_out
from service.tasks.repository import TaskRepository

log = logging.getLogger("meterline.tasks")


async def expire_tasks(
    session: AsyncSession,
    now: datetime | None = None,
    account_ids: Sequence[uuid.UUID] | None = None,
    guard: LiveTasks | None = None,
    *,
    task_ids: Sequence[uuid.UUID] | None = None,
    skip_locked: bool = False,
) -> int:
    """Close the open quoted tasks whose deadline is past `now` (of these accounts, or all)
    as `expired`, at their deadline, billed by each account's expired-task policy, each with
    its `task.completed` event. The proxy refuses further requests on them. Idempotent: a
    task expires once; running it again, from the background job or an invoice, changes
    nothing. Returns how many."""
    repository = TaskRepository(session)
    at = now or await repository.now()
    due = await repository.due_for_expiry(at, account_ids, skip_locked)
    if task_ids is not None:
        due = [row for row in due if row.id in set(task_ids)]
    if not due:
        return 0
    await repository.expire(
        {
            row.id: task_billing(
                TaskOutcome.EXPIRED,
                FailedTaskPolicy(row.failed_task_policy),
                ExpiredTaskPolicy(row.expired_task_policy),
            ).value
            for row in due
        }
    )
    closed = {task.id: task for task in await repository.reread([row.id for row in due])}
    for row in due:
        await repository.notify(
            json.dumps(
                {"event": "closed", "account_id": str(row.account_id), "task_id": row.external_id}
            )
        )
        if guard is not None:
            guard.mark_closed(row.account_id, row.external_id)
        log.info("event=task_expired account_id=%s task_id=%s", row.account_id, row.external_id)
        # Told as a reported outcome is, in the transaction that closed the task.
        usage = await repository.usage(row.account_id, row.external_id)
        await raise_completed(
            session, task_out(closed[row.id], usage, row.account_id, row.external_id)
        )
    return len(due)


def expiry_job(
    sessions: async_sessionmaker[AsyncSession], guard: LiveTasks, interval: float
) -> Periodic:
    """Expire every account's due tasks every `interval` seconds (a round that fails, the
    database down, is caught up by the next)."""

    async def one_round() -> None:
        async with transaction(sessions) as session:
            await expire_tasks(session, guard=guard, skip_locked=True)

    return Periodic("task_expiry", interval, one_round, log)
