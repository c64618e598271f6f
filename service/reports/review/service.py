"""Usage an operator reviews: claims flagged as implausible, and rows Postgres refused.

A flagged row is billed as the provider claimed it once an admin accepts it, or corrected
by an adjustment row the review adds to the ledger (the ledger is append-only: the review
is a row of `flagged_usage_reviews`). Until then it blocks finalization of the invoice
that would bill it (`service.invoices.flagged`).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal

from sqlalchemy.ext.asyncio import AsyncSession

from service.adjustments.service import record_adjustment
from service.db.models import FlaggedUsageReview, QuarantinedUsage, UsageRecord
from service.errors import Conflict, NotFound
from service.reports.review.repository import ReviewRepository
from service.reports.review.schemas import FlaggedUsageRow, QuarantinedRow, ReviewOut

FlaggedRow = tuple[UsageRecord, FlaggedUsageReview | None]


def flagged_out(row: UsageRecord, review: FlaggedUsageReview | None) -> FlaggedUsageRow:
    assert row.usage_flag is not None
    return FlaggedUsageRow(
        request_id=row.request_id,
        account_id=row.account_id,
        occurred_at=row.occurred_at,
        recorded_at=row.recorded_at,
        model=row.requested_model,
        upstream_model=row.upstream_model,
        endpoint=row.endpoint,
        status_code=row.status_code,
        prompt_tokens=row.prompt_tokens,
        completion_tokens=row.completion_tokens,
        total_tokens=row.total_tokens,
        cached_tokens=row.cached_tokens,
        reasoning_tokens=row.reasoning_tokens,
        cost_usd=row.cost_usd,
        usage_flag=row.usage_flag,
        review=ReviewOut.model_validate(review) if review is not None else None,
    )


def quarantined_out(row: QuarantinedUsage) -> QuarantinedRow:
    return QuarantinedRow(
        request_id=row.request_id,
        account_id=row.account_id,
        occurred_at=row.occurred_at,
        quarantined_at=row.quarantined_at,
        source=row.source,
        sqlstate=row.sqlstate,
        reason=row.reason,
        # The JSON line as written: JSON escapes a NUL (`\\u0000`), so it reads back exactly.
        record=row.record.decode("utf-8", "replace"),
    )


class AlreadyReviewed(Conflict):
    code = "already_reviewed"
    description = "The flagged usage was reviewed already, the other way."


def flagged_not_found(request_id: str) -> NotFound:
    return NotFound(f"no flagged usage with request id {request_id}", param="path.request_id")


async def _flagged(repository: ReviewRepository, request_id: str) -> FlaggedRow:
    found = await repository.flagged_row(request_id)
    if found is None:
        raise flagged_not_found(request_id)
    return found


def _reviewed_already(request_id: str, review: FlaggedUsageReview) -> AlreadyReviewed:
    return AlreadyReviewed(
        f"flagged usage {request_id} was reviewed already ({review.decision}"
        f" at {review.reviewed_at.isoformat()})"
    )


async def accept(session: AsyncSession, request_id: str, note: str | None) -> FlaggedRow:
    """Bill the row as claimed. Accepting it again changes nothing."""
    repository = ReviewRepository(session)
    row, review = await _flagged(repository, request_id)
    if review is None:
        review = await repository.add_review(row, "accepted", note)
        if review is None:  # reviewed meanwhile by another call
            row, review = await _flagged(repository, request_id)
    assert review is not None
    if review.decision != "accepted":
        raise _reviewed_already(request_id, review)
    return row, review


async def adjust(
    session: AsyncSession, request_id: str, amount_usd: Decimal, note: str | None
) -> FlaggedRow:
    """Correct the row by `amount_usd` with an adjustment row of the same month."""
    repository = ReviewRepository(session)
    row, review = await _flagged(repository, request_id)
    if review is None:
        adjustment = await record_adjustment(
            session,
            row.account_id,
            row.occurred_at,  # the same month as the row it corrects
            amount_usd,
            note or f"correction of flagged usage {request_id}",
            row.requested_model,
            row.endpoint,
        )
        review = await repository.add_review(row, "adjusted", note, adjustment.id)
        if review is not None:
            return row, review
        # Reviewed meanwhile by another call: this transaction (and its adjustment) fails.
        row, review = await _flagged(repository, request_id)
    assert review is not None
    raise _reviewed_already(request_id, review)


async def flagged_report(
    session: AsyncSession,
    start: datetime,
    end: datetime,
    account_id: uuid.UUID | None,
    unreviewed_only: bool,
    limit: int,
    after: tuple[datetime, str] | None,
) -> list[FlaggedRow]:
    rows = await ReviewRepository(session).flagged(
        start, end, account_id, unreviewed_only, limit, after
    )
    return list(rows)


async def quarantined_report(
    session: AsyncSession,
    account_id: uuid.UUID | None,
    limit: int,
    after: tuple[datetime, str] | None,
) -> list[QuarantinedUsage]:
    return list(await ReviewRepository(session).quarantined(account_id, limit, after))
