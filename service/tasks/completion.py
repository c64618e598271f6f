"""A task as the API shows it, and the `task.completed` event that tells its outcome: the
same whether an outcome was reported or the task expired at its deadline."""

from __future__ import annotations

import uuid

from sqlalchemy.ext.asyncio import AsyncSession

from service.db.models import Task
from service.tasks.repository import TaskUsage
from service.tasks.schemas import TaskOut
from service.webhooks.events import EventType
from service.webhooks.outbox import raise_event


def task_out(task: Task | None, usage: TaskUsage, account_id: uuid.UUID, task_id: str) -> TaskOut:
    if task is None:  # seen only in the ledger so far
        assert usage.first_at is not None
        return TaskOut(
            id=task_id,
            account_id=account_id,
            task_type=usage.ledger_task_type,
            model=usage.ledger_model,
            status="open",
            quoted=False,
            quote_id=None,
            fixed_price_usd=None,
            cost_cap_usd=None,
            requests=usage.requests,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            total_tokens=usage.total_tokens,
            cost_usd=usage.cost_usd,
            unpriced_requests=usage.unpriced_requests,
            created_at=usage.first_at,
            expires_at=None,
            completed_at=None,
            billed_as=None,
        )
    return TaskOut(
        id=task.external_id,
        account_id=task.account_id,
        task_type=task.task_type or usage.ledger_task_type,
        model=task.model or usage.ledger_model,
        status=task.status,
        quoted=task.quote_id is not None,
        quote_id=task.quote_id,
        fixed_price_usd=task.fixed_price_usd,
        cost_cap_usd=task.cost_cap_usd,
        requests=usage.requests,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
        cost_usd=usage.cost_usd,
        unpriced_requests=usage.unpriced_requests,
        created_at=task.created_at,
        expires_at=task.expires_at,
        completed_at=task.completed_at,
        billed_as=task.billed_as,
    )


def _event_data(task: TaskOut) -> dict[str, object]:
    """What a `task.completed` webhook says: the task as GET /billing/tasks/{id} shows it."""
    return task.model_dump(
        mode="json",
        include={
            "id", "account_id", "task_type", "model", "status", "quoted", "quote_id",
            "fixed_price_usd", "cost_usd", "requests", "total_tokens", "completed_at",
            "billed_as",
        },
    )  # fmt: skip


async def raise_completed(session: AsyncSession, task: TaskOut) -> None:
    """Raise `task.completed` for a task just closed, in the transaction that closed it."""
    await raise_event(session, EventType.TASK_COMPLETED, _event_data(task), task.account_id)
