from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse, StreamingResponse

from service.deps import Caller, Engine, Session
from service.errors import API_ERRORS, NotInstalled, errors
from service.schemas import CursorParam, Page, Text, UTCTime
from service.usage import export, service
from service.usage.repository import UsageFilter
from service.usage.schemas import GROUPS, ExportFormat, UsageEvent, UsageReport

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


@router.get(
    "/events/export",
    response_class=StreamingResponse,
    responses={
        **errors(*API_ERRORS, NotInstalled),
        200: {
            "description": "The rows, streamed; columns as `GET /billing/usage/events`.",
            "content": {
                "text/csv": {"schema": {"type": "string"}},
                "application/x-ndjson": {"schema": {"type": "string"}},
                "application/vnd.apache.parquet": {
                    "schema": {"type": "string", "format": "binary"}
                },
            },
        },
    },
)
async def usage_events_export(
    session: Session,
    engine: Engine,
    caller: Caller,
    start: Annotated[UTCTime, Query(description="RFC 3339, inclusive; without an offset, UTC.")],
    end: Annotated[
        UTCTime,
        Query(description="RFC 3339, exclusive; at most 366 days after `start`."),
    ],
    fmt: Annotated[ExportFormat, Query(alias="format")] = "csv",
    account_id: AccountId = None,
    key_id: KeyId = None,
    task_id: TaskId = None,
    model: Model = None,
) -> StreamingResponse:
    """Every ledger row in [start, end), oldest first, as one file: for audits and data teams.

    The columns of `GET /billing/usage/events`, exact cost as a decimal string (Parquet:
    decimal128(24, 12)); CSV cells a spreadsheet would run as a formula are prefixed with
    `'`. Streamed from the database in constant memory. Parquet needs the server's
    `parquet` extra (pyarrow); without it, a 501.
    """
    # Everything that can be refused is checked before the first byte: once streaming has
    # begun, the status is already 200. That includes a database that is down (a 503).
    export.check_range(start, end)
    export.check_format(fmt)
    await session.connection()
    where = await service.scoped_filter(
        session,
        caller,
        account_id=account_id,
        key_id=key_id,
        task_id=task_id,
        model=model,
        start=start,
        end=end,
    )
    return StreamingResponse(
        export.export_events(engine, where, fmt),
        media_type=export.MEDIA_TYPES[fmt],
        headers={"Content-Disposition": f'attachment; filename="{export.filename(where, fmt)}"'},
    )
