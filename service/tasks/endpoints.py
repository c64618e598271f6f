from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Path, Query

from pricing.invoice import TaskStatus
from service.deps import Caller, Guard, Session
from service.errors import API_ERRORS, errors
from service.schemas import CursorParam, Limit, Page, Text, UTCTime
from service.tasks import service
from service.tasks.repository import TaskFilter
from service.tasks.schemas import TaskComplete, TaskOut

router = APIRouter(prefix="/billing/tasks", tags=["tasks"], responses=errors(*API_ERRORS))


TaskIdPath = Annotated[Text, Path(min_length=1, max_length=128, description="The `X-Task-Id`.")]
AccountId = Annotated[
    uuid.UUID | None,
    Query(description="Admin: the task's account (required). A customer key: its own."),
]


@router.get("", response_model=Page[TaskOut])
async def list_tasks(
    session: Session,
    caller: Caller,
    account_id: Annotated[
        uuid.UUID | None, Query(description="Admin: one account (default all).")
    ] = None,
    status: Annotated[TaskStatus | None, Query()] = None,
    task_type: Annotated[Text | None, Query(min_length=1, max_length=128)] = None,
    model: Annotated[Text | None, Query(min_length=1, max_length=256)] = None,
    quoted: Annotated[bool | None, Query(description="Only tasks with (or without) quote.")] = None,
    completed_from: Annotated[UTCTime | None, Query(description="RFC 3339, inclusive.")] = None,
    completed_to: Annotated[UTCTime | None, Query(description="RFC 3339, exclusive.")] = None,
    limit: Limit = 50,
    cursor: CursorParam = None,
) -> Page[TaskOut]:
    """Tasks newest first, each with its usage summed from the ledger."""
    where = TaskFilter(
        account_id=account_id,
        status=status,
        task_type=task_type,
        model=model,
        quoted=quoted,
        completed_from=completed_from,
        completed_to=completed_to,
    )
    return await service.list_tasks(session, caller, where, limit, cursor)


@router.get("/{task_id:path}", response_model=TaskOut)
async def get_task(
    task_id: TaskIdPath, session: Session, caller: Caller, account_id: AccountId = None
) -> TaskOut:
    """One task by its `X-Task-Id`: status, fixed price, requests, tokens and exact cost."""
    return await service.get_task(session, caller, task_id, account_id)


@router.post(
    "/{task_id:path}/complete",
    response_model=TaskOut,
    responses=errors(*API_ERRORS, service.OutcomeReportedByOperator, service.TaskAlreadyCompleted),
)
async def complete_task(
    task_id: TaskIdPath,
    data: TaskComplete,
    session: Session,
    caller: Caller,
    guard: Guard,
    account_id: AccountId = None,
) -> TaskOut:
    """Record the task's outcome (the admin; a customer key only where its account has
    `customer_reported_outcomes`). Further requests on the task are refused by the proxy."""
    return await service.complete_task(session, guard, caller, task_id, account_id, data.outcome)
