"""Adjustments: corrections of an account's bill, as rows of the append-only ledger.

An adjustment is a ledger row of kind `adjustment` with no tokens and its amount as its
exact cost, so every reader of the ledger (invoices, usage events, exports, budgets) sees it
with nothing of its own to know. It belongs to the month of its `occurred_at` and to the
invoice that bills that month's rows by when they were recorded: a month still open bills
it on its own invoice; a finalized month's rows recorded later are late usage, billed on
the next invoice (`pricing.invoice`). Flagged-usage reviews correct a row the same way.
"""

from __future__ import annotations

import logging
import uuid
from datetime import datetime
from decimal import Decimal

from sqlalchemy.ext.asyncio import AsyncSession

from pricing.invoice import BillingPeriod
from service.adjustments.repository import AdjustmentRepository
from service.adjustments.schemas import AdjustmentCreate, AdjustmentOut
from service.errors import Unprocessable
from service.ledger.record import new_request_id

log = logging.getLogger("meterline.adjustments")

# The ledger row of an adjustment of the whole account names no model and no endpoint of
# the proxy.
ACCOUNT_ADJUSTMENT_MODEL = ""
ADJUSTMENT_ENDPOINT = "adjustment"


async def record_adjustment(
    session: AsyncSession,
    account_id: uuid.UUID,
    occurred_at: datetime,
    amount_usd: Decimal,
    reason: str,
    model: str = ACCOUNT_ADJUSTMENT_MODEL,
    endpoint: str = ADJUSTMENT_ENDPOINT,
) -> AdjustmentOut:
    """The one way to write an adjustment (the account exists: the caller checked)."""
    request_id = "adj_" + new_request_id().removeprefix("req_")
    recorded_at = await AdjustmentRepository(session).add(
        request_id, account_id, occurred_at, amount_usd, reason, model, endpoint
    )
    log.info(
        "event=adjustment_recorded account_id=%s request_id=%s amount_usd=%s",
        account_id,
        request_id,
        amount_usd,
    )
    return AdjustmentOut(
        id=request_id,
        account_id=account_id,
        amount_usd=amount_usd,
        reason=reason,
        occurred_at=occurred_at,
        recorded_at=recorded_at,
        period=str(BillingPeriod.of(occurred_at)),
    )


async def adjust_account(
    session: AsyncSession, account_id: uuid.UUID, data: AdjustmentCreate
) -> AdjustmentOut:
    now = await AdjustmentRepository(session).now()
    occurred_at = data.occurred_at or now
    if occurred_at > now:
        raise Unprocessable(
            "body.occurred_at: an adjustment cannot occur in the future", param="body.occurred_at"
        )
    return await record_adjustment(session, account_id, occurred_at, data.amount_usd, data.reason)


async def adjustments_in(
    session: AsyncSession, account_id: uuid.UUID, period: BillingPeriod
) -> list[AdjustmentOut]:
    """The account's adjustments that occurred in the month, with their reasons."""
    rows = await AdjustmentRepository(session).of_account(account_id, period.start, period.end)
    return [
        AdjustmentOut(
            id=adjustment.request_id,
            account_id=account_id,
            amount_usd=amount,
            reason=adjustment.reason,
            occurred_at=adjustment.occurred_at,
            recorded_at=recorded_at,
            period=str(period),
        )
        for adjustment, amount, recorded_at in rows
    ]
