"""Tasks: read with their usage, list, complete; open a quoted task (from an accepted quote).

A task row exists for every quoted task (made when its quote is accepted) and for a task
without quote once it is completed or listed; until then a task seen only in the ledger
is still readable by its id (status `open`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import uuid
from datetime import datetime
from decimal import Decimal

from sqlalchemy.ext.asyncio import AsyncSession

from pricing.invoice import (
    ExpiredTaskPolicy,
    FailedTaskPolicy,
    TaskBilling,
    TaskOutcome,
    task_billing,
)
from service.accounts.repository import AccountRepository
from service.auth.principal import Principal
from service.db.models import Task
from service.errors import Conflict, Forbidden, NotFound, Unprocessable
from service.parts import LiveTasks
from service.schemas import Page, decode_cursor, keyset_page
from service.tasks.completion import raise_completed, task_out
from service.tasks.expiry import expire_tasks
from service.tasks.repository import TaskFilter, TaskRepository
from service.tasks.schemas import Outcome, TaskOut

log = logging.getLogger("meterline.tasks")


class OutcomeReportedByOperator(Forbidden):
    description = "A customer key, on an account that leaves outcomes to the operator."


class TaskAlreadyCompleted(Conflict):
    code = "task_already_completed"
    description = "The task is already completed."


class TaskIdInUse(Conflict):
    code = "task_id_in_use"
    description = "The task id is in use in the account (or has usage already)."


def account_of(caller: Principal, account_id: uuid.UUID | None) -> uuid.UUID:
    """The account a task id is looked up in: a customer's own; the admin must name one."""
    scoped = caller.scope(account_id)
    if scoped is None:
        raise Unprocessable(
            "query.account_id: required with the admin token (task ids are unique per account)",
            param="query.account_id",
        )
    return scoped


async def get_task(
    session: AsyncSession, caller: Principal, task_id: str, account_id: uuid.UUID | None
) -> TaskOut:
    account = account_of(caller, account_id)
    repository = TaskRepository(session)
    task = await repository.get(account, task_id)
    usage = await repository.usage(account, task_id)
    if task is None and not usage.seen:
        raise NotFound(f"task {task_id!r} not found", param="path.task_id")
    return task_out(task, usage, account, task_id)


async def list_tasks(
    session: AsyncSession,
    caller: Principal,
    where: TaskFilter,
    limit: int,
    cursor: str | None,
) -> Page[TaskOut]:
    where = dataclasses.replace(where, account_id=caller.scope(where.account_id))
    repository = TaskRepository(session)
    await repository.adopt_from_ledger(where.account_id)
    after = decode_cursor(cursor, datetime, uuid.UUID) if cursor else None
    rows = await repository.page(where, limit + 1, after)
    return keyset_page(
        Page[TaskOut],
        rows,
        limit,
        lambda row: task_out(row[0], row[1], row[0].account_id, row[0].external_id),
        lambda row: (row[0].created_at.isoformat(), str(row[0].id)),
    )


async def _require_outcome_reporter(
    session: AsyncSession, caller: Principal, account_id: uuid.UUID
) -> None:
    """The outcome decides what a quoted task is billed (a failed one is free by default), so
    the operator reports it, unless the account lets its own keys do so."""
    if caller.is_admin:
        return
    account = await AccountRepository(session).get_account(account_id)
    if account is None or not account.customer_reported_outcomes:
        raise OutcomeReportedByOperator(
            "a customer key cannot report a task's outcome on this account; the operator"
            " reports it with the admin token (or sets customer_reported_outcomes)"
        )


async def complete_task(
    session: AsyncSession,
    guard: LiveTasks | None,
    caller: Principal,
    task_id: str,
    account_id: uuid.UUID | None,
    outcome: Outcome,
    now: datetime | None = None,
) -> TaskOut:
    """Record a task's outcome (at `now`, default the database's); a quoted task is billed
    as `task_billing` decides with the account's policies in force now. A quoted task past
    its deadline has expired: it is closed as such and the completion refused."""
    account = account_of(caller, account_id)
    await _require_outcome_reporter(session, caller, account)
    repository = TaskRepository(session)
    task = await repository.get(account, task_id, for_update=True)
    if (
        task is not None
        and task.status == "open"
        and task.expires_at is not None
        and await expire_tasks(session, now, [account], guard, task_ids=[task.id])
    ):
        await session.refresh(task)
    if task is None:
        # A task without quote gets its row now; a concurrent completion may win the insert.
        seen = await repository.usage(account, task_id)
        if not seen.seen:
            raise NotFound(f"task {task_id!r} not found", param="path.task_id")
        # Dated by its first request, as a listed task is: lists stay in creation order.
        await repository.insert(
            {"account_id": account, "external_id": task_id, "created_at": seen.first_at}
        )
        task = await repository.get(account, task_id, for_update=True)
        assert task is not None
    if task.status != "open":
        raise TaskAlreadyCompleted(f"task {task_id!r} is already completed ({task.status})")
    usage = await repository.usage(account, task_id)
    cost = await repository.history_cost(account, task_id)
    billed_as: TaskBilling | None = None
    if task.quote_id is not None:
        failed, expired = await repository.policies(account)
        billed_as = task_billing(
            TaskOutcome(outcome), FailedTaskPolicy(failed), ExpiredTaskPolicy(expired)
        )
    task = await repository.complete(
        task, TaskOutcome(outcome), cost, usage.ledger_task_type, usage.ledger_model, billed_as, now
    )
    await repository.notify(
        json.dumps({"event": "closed", "account_id": str(account), "task_id": task_id})
    )
    if guard is not None:
        guard.mark_closed(account, task_id)
    log.info(
        "event=task_completed account_id=%s task_id=%s outcome=%s quoted=%s",
        account,
        task_id,
        outcome,
        task.quote_id is not None,
    )
    completed = task_out(task, usage, account, task_id)
    await raise_completed(session, completed)
    return completed


async def open_quoted_task(
    session: AsyncSession,
    guard: LiveTasks | None,
    values: dict[str, object],
    cap: Decimal,
) -> Task:
    """Insert the task an accepted quote binds; a task id already in use is a 409."""
    repository = TaskRepository(session)
    account = values["account_id"]
    task_id = values["external_id"]
    assert isinstance(account, uuid.UUID) and isinstance(task_id, str)
    if await repository.has_usage(account, task_id):
        raise TaskIdInUse(
            f"task id {task_id!r} already has usage; a quoted task needs a new id",
            param="body.task_id",
        )
    task = await repository.insert(values)
    if task is None:
        raise TaskIdInUse(
            f"task id {task_id!r} is already in use in this account", param="body.task_id"
        )
    # The row's `created_at` is the acceptance: the task covers requests from then on.
    await repository.notify(
        json.dumps(
            {
                "event": "opened",
                "account_id": str(account),
                "task_id": task_id,
                "model": task.model,
                "accepted_at": task.created_at.isoformat(),
                "expires_at": task.expires_at.isoformat() if task.expires_at else None,
                "cap": str(cap),
            }
        )
    )
    if guard is not None:
        assert task.model is not None
        guard.mark_open_quoted(account, task_id, task.model, task.created_at, cap, task.expires_at)
    return task
