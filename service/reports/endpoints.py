from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse

from service.deps import Caller, Engine, Session
from service.errors import API_ERRORS, errors
from service.invoices import service as invoices
from service.reports.schemas import MonthlyReport, ReportFormat, UnpricedReport
from service.reports.service import export_monthly, unpriced_report
from service.schemas import Period

router = APIRouter(prefix="/billing/reports", tags=["reports"], responses=errors(*API_ERRORS))

MEDIA_TYPES = {"csv": "text/csv; charset=utf-8", "json": "application/json"}


@router.get(
    "/monthly",
    response_class=StreamingResponse,
    responses={
        200: {
            "model": MonthlyReport,
            "description": "The report, streamed. CSV columns: see the README.",
            "content": {"text/csv": {"schema": {"type": "string"}}},
        }
    },
)
async def monthly_report(
    session: Session,
    engine: Engine,
    caller: Caller,
    period: Annotated[
        Period, Query(description="The month, `YYYY-MM` (UTC).", examples=["2026-11"])
    ],
    fmt: Annotated[ReportFormat, Query(alias="format")] = "csv",
    account_id: Annotated[
        uuid.UUID | None,
        Query(description="Admin: one account (default all). A customer key: only its own."),
    ] = None,
) -> StreamingResponse:
    """Requests, tokens, exact cost and the invoice, per account and model, for one month.

    One row per account and model, and task type too for the usage of quoted tasks; then a
    totals row. Streamed in constant memory whatever the month's size.
    """
    # Everything that can be refused is checked before the first byte (the period by its
    # type): once streaming has begun, the status is already 200. That includes a database
    # that is down (a 503).
    account_id = caller.scope(account_id)
    await session.connection()
    suffix = f"-{account_id}" if account_id else ""
    return StreamingResponse(
        export_monthly(engine, period, fmt, account_id),
        media_type=MEDIA_TYPES[fmt],
        headers={"Content-Disposition": f'attachment; filename="meterline-{period}{suffix}.{fmt}"'},
    )


@router.get("/unpriced", response_model=UnpricedReport)
async def unpriced_usage(
    session: Session,
    caller: Caller,
    period: Annotated[Period, Query(description="UTC month, `YYYY-MM`.")],
    account_id: uuid.UUID | None = None,
) -> UnpricedReport:
    """Usage stored without a price in the month, per account and model.

    `requests_priced_now` counts rows a price added since covers (a draft prices them by the
    version in force at each row's time); `requests_without_price` block finalization.
    """
    rows = await unpriced_report(session, invoices.parse_period(period), caller.scope(account_id))
    return UnpricedReport(period=period, data=rows)
