from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Path, Query

from service.deps import Admin, Caller, Session
from service.errors import API_ERRORS, errors
from service.reports.review import service
from service.reports.review.schemas import (
    FlaggedUsageAccept,
    FlaggedUsageAdjust,
    FlaggedUsagePage,
    FlaggedUsageRow,
    QuarantinedRow,
)
from service.schemas import (
    CursorParam,
    Limit,
    Page,
    Period,
    decode_cursor,
    keyset_page,
    parse_period,
)

router = APIRouter(prefix="/billing/reports", tags=["reports"], responses=errors(*API_ERRORS))

REVIEWED = errors(*API_ERRORS, service.AlreadyReviewed)
RequestId = Annotated[str, Path(max_length=40, pattern=r"^[A-Za-z0-9_]+$")]


def _position(cursor: str | None) -> tuple[datetime, str] | None:
    if not cursor:
        return None
    at, request_id = decode_cursor(cursor, datetime, str)
    return at, request_id


@router.get("/flagged", response_model=FlaggedUsagePage)
async def flagged_usage(
    session: Session,
    caller: Caller,
    period: Annotated[Period, Query(description="The month, `YYYY-MM` (UTC).")],
    account_id: uuid.UUID | None = None,
    unreviewed: Annotated[
        bool, Query(description="Only rows no admin has reviewed yet (they block finalizing).")
    ] = False,
    limit: Limit = 50,
    cursor: CursorParam = None,
) -> FlaggedUsagePage:
    """Usage the provider claimed implausibly, stored as claimed and flagged, oldest first.

    Like unpriced usage, an unreviewed row blocks finalization of the invoice that bills
    it, until an admin accepts it or corrects it with an adjustment.
    """
    month = parse_period(period)
    rows = await service.flagged_report(
        session,
        month.start,
        month.end,
        caller.scope(account_id),
        unreviewed,
        limit + 1,
        _position(cursor),
    )
    return keyset_page(
        FlaggedUsagePage,
        rows,
        limit,
        lambda row: service.flagged_out(*row),
        lambda row: (row[0].occurred_at.isoformat(), row[0].request_id),
        period=period,
    )


@router.post("/flagged/{request_id}/accept", response_model=FlaggedUsageRow, responses=REVIEWED)
async def accept_flagged_usage(
    request_id: RequestId, data: FlaggedUsageAccept, session: Session, _: Admin
) -> FlaggedUsageRow:
    """Bill a flagged row as the provider claimed it (admin). Again: no change."""
    return service.flagged_out(*await service.accept(session, request_id, data.note))


@router.post("/flagged/{request_id}/adjust", response_model=FlaggedUsageRow, responses=REVIEWED)
async def adjust_flagged_usage(
    request_id: RequestId, data: FlaggedUsageAdjust, session: Session, _: Admin
) -> FlaggedUsageRow:
    """Correct a flagged row with an adjustment row of its month, `amount_usd` (admin)."""
    row = await service.adjust(session, request_id, data.amount_usd, data.note)
    return service.flagged_out(*row)


@router.get("/quarantine", response_model=Page[QuarantinedRow])
async def quarantined_usage(
    session: Session,
    _: Admin,
    account_id: uuid.UUID | None = None,
    limit: Limit = 50,
    cursor: CursorParam = None,
) -> Page[QuarantinedRow]:
    """Ledger records Postgres refused for their content, oldest first (admin).

    The writer stores a refused batch row by row: only these rows are missing from the
    ledger, each with Postgres' reason and the record as it was to be stored.
    """
    rows = await service.quarantined_report(session, account_id, limit + 1, _position(cursor))
    return keyset_page(
        Page[QuarantinedRow],
        rows,
        limit,
        service.quarantined_out,
        lambda row: (row.quarantined_at.isoformat(), row.request_id),
    )
