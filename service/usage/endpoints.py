from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse

from service.deps import Caller, Session
from service.errors import API_ERRORS, errors
from service.schemas import CursorParam, Page, Text, UTCTime
from service.usage import service
from service.usage.repository import UsageFilter
from service.usage.schemas import GROUPS, UsageEvent, UsageReport

router = APIRouter(prefix="/billing/usage", tags=["usage"], responses=errors(*API_ERRORS))

AccountId = Annotated[
    uuid.UUID | None,
    Query(description="Admin: any account (default all). A customer key: only its own."),
]
KeyId = Annotated[uuid.UUID | None, Query()]
TaskId = Annotated[Text | None, Query(max_length=128, description="The `X-Task-Id`.")]
Model = Annotated[Text | None, Query(max_length=256, description="The model asked for.")]
Start = Annotated[UTCTime | None, Query(description="RFC 3339, inclusive; without an offset, UTC.")]
End = Annotated[UTCTime | None, Query(description="RFC 3339, exclusive; without an offset, UTC.")]
GroupByParam = Annotated[
    Text | None,
    Query(
        max_length=200,
        description=f"Comma-separated, any of: {', '.join(GROUPS)}. None: one row of totals.",
        examples=["day,model"],
    ),
]


async def _filter(
    session: Session,
    caller: Caller,
    account_id: AccountId = None,
    key_id: KeyId = None,
    task_id: TaskId = None,
    model: Model = None,
    start: Start = None,
    end: End = None,
) -> UsageFilter:
    return await service.scoped_filter(
        session,
        caller,
        account_id=account_id,
        key_id=key_id,
        task_id=task_id,
        model=model,
        start=start,
        end=end,
    )


Filter = Annotated[UsageFilter, Depends(_filter)]


@router.get("", response_model=UsageReport, response_model_exclude_unset=True)
async def usage(
    session: Session,
    where: Filter,
    group_by: GroupByParam = None,
    limit: Annotated[int, Query(ge=1, le=10_000, description="Most groups returned.")] = 1000,
) -> JSONResponse:
    """Requests, tokens and exact cost over [start, end), grouped by the `group_by` dimensions.

    Each row carries the fields of its groups (`day`, `month`, `model`, `key_id`, `task_id`,
    `task_type`, `provider`, `status_code`) and the totals. Groups come in group order.
    """
    groups = service.parse_group_by(group_by)
    report = await service.usage_report(session, where, groups, limit)
    return JSONResponse(report.model_dump(mode="json", exclude_unset=True))


@router.get("/events", response_model=Page[UsageEvent])
async def usage_events(
    session: Session,
    where: Filter,
    limit: Annotated[int, Query(ge=1, le=1000, description="Page size.")] = 100,
    cursor: CursorParam = None,
) -> Page[UsageEvent]:
    """Raw ledger rows, oldest first by (occurred_at, request_id), a page at a time.

    Pages are cut on that key, so rows recorded while paging never shift, repeat or hide
    the rows already there.
    """
    return await service.usage_events(session, where, limit, cursor)
