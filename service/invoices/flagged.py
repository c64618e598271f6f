"""The one check invoice finalization makes for flagged usage (reviewed under reports)."""

from __future__ import annotations

import uuid

from sqlalchemy.ext.asyncio import AsyncSession

from pricing.invoice import BillingPeriod
from service.errors import Conflict
from service.invoices.repository.flagged import UnreviewedUsageRepository

_NAMED = 5


class FlaggedUsage(Conflict):
    code = "flagged_usage"
    description = "Flagged usage the invoice bills is not reviewed yet (the message names it)."


async def refuse_unreviewed_flagged_usage(
    session: AsyncSession, account_id: uuid.UUID, period: BillingPeriod
) -> None:
    """409 `flagged_usage` while the invoice would bill a flagged usage claim no admin has
    reviewed (accepted or adjusted); the message names them."""
    ids, count = await UnreviewedUsageRepository(session).unreviewed_billed_by(
        account_id, period.start, period.end, _NAMED
    )
    if not count:
        return
    more = f" and {count - len(ids)} more" if count > len(ids) else ""
    raise FlaggedUsage(
        f"usage the provider claimed implausibly blocks finalization: {', '.join(ids)}{more}."
        " Review each (GET /billing/reports/flagged): accept it as claimed"
        " (POST /billing/reports/flagged/{request_id}/accept) or correct it"
        " (POST …/adjust) and finalize again"
    )
