from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query

from service.deps import Admin, Session
from service.errors import API_ERRORS, errors
from service.reports.margin.schemas import MarginReport
from service.reports.margin.service import margin_report
from service.schemas import Period

router = APIRouter(prefix="/billing/reports", tags=["reports"], responses=errors(*API_ERRORS))


@router.get("/margin", response_model=MarginReport)
async def get_margin_report(
    session: Session,
    _: Admin,
    period: Annotated[Period, Query(examples=["2026-11"])],
    account_id: Annotated[uuid.UUID | None, Query(description="One account (default all).")] = None,
) -> MarginReport:
    """Quoted tasks completed in `period`, per task type and model (admin: it shows costs)."""
    return await margin_report(session, period, account_id)
