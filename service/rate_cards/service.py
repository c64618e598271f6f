"""Rate cards: named, versioned pricing plans, and which account pays by which from when.

A version is never edited (new terms are a new version) and an assignment never changes
(a new plan from a date is a new assignment), so the history of what an account was charged
and why stays readable. Neither touches a ledger row: each row keeps the cost and the
rate-card version it was written with; only rows stored without a price are priced on the
next draft by the terms in force at their time.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncSession

from service.db.models import AccountRateCard, RateCard, RateCardRate, RateCardVersion
from service.errors import Conflict, NotFound
from service.rate_cards.repository import RateCardRepository
from service.rate_cards.schemas import (
    RateCardAssignmentOut,
    RateCardCreate,
    RateCardOut,
    RateCardVersionCreate,
    RateCardVersionOut,
    RateOut,
)

log = logging.getLogger("meterline.rate_cards")


class RateCardExists(Conflict):
    code = "rate_card_exists"
    description = "A rate card of that name exists."


class RateCardVersionExists(Conflict):
    code = "rate_card_version_exists"
    description = "The rate card has a version from that instant already."


class AssignmentExists(Conflict):
    code = "rate_card_assignment_exists"
    description = "The account has a rate-card assignment from that instant already."


def _card_not_found(card_id: int, param: str = "path.rate_card_id") -> NotFound:
    return NotFound(f"rate card {card_id} not found", param=param)


def _version_out(version: RateCardVersion, rates: list[RateCardRate]) -> RateCardVersionOut:
    return RateCardVersionOut(
        id=version.id,
        rate_card_id=version.rate_card_id,
        effective_from=version.effective_from,
        markup_pct=version.markup_pct,
        markup_basis=version.markup_basis,
        rates=[RateOut.model_validate(r) for r in rates],
        created_at=version.created_at,
    )


async def _cards_out(repository: RateCardRepository, cards: list[RateCard]) -> list[RateCardOut]:
    versions = await repository.versions([c.id for c in cards])
    by_card: dict[int, list[RateCardVersionOut]] = {}
    for version, rates in versions:
        by_card.setdefault(version.rate_card_id, []).append(_version_out(version, rates))
    return [
        RateCardOut(
            id=c.id,
            name=c.name,
            description=c.description,
            created_at=c.created_at,
            versions=by_card.get(c.id, []),
        )
        for c in cards
    ]


async def list_rate_cards(session: AsyncSession) -> list[RateCardOut]:
    repository = RateCardRepository(session)
    return await _cards_out(repository, await repository.cards())


async def get_rate_card(session: AsyncSession, card_id: int) -> RateCardOut:
    repository = RateCardRepository(session)
    card = await repository.card(card_id)
    if card is None:
        raise _card_not_found(card_id)
    return (await _cards_out(repository, [card]))[0]


async def _add_version(
    repository: RateCardRepository, card_id: int, data: RateCardVersionCreate
) -> None:
    effective_from = (data.effective_from or datetime.now(UTC)).astimezone(UTC)
    if await repository.version_at(card_id, effective_from) is not None:
        # Versions follow one another: two from one instant would leave the terms then
        # undecided.
        raise RateCardVersionExists(
            f"rate card {card_id} has a version from {effective_from.isoformat()} already;"
            " versions are never edited: give the new terms another effective_from",
            param="body.effective_from",
        )
    version = RateCardVersion(
        rate_card_id=card_id,
        effective_from=effective_from,
        markup_pct=data.markup_pct,
        markup_basis=data.markup_basis,
    )
    await repository.add(version)
    await repository.add_rates(
        [
            RateCardRate(
                version_id=version.id,
                model=r.model,
                input_usd_per_mtok=r.input_usd_per_mtok,
                output_usd_per_mtok=r.output_usd_per_mtok,
                cached_input_usd_per_mtok=r.cached_input_usd_per_mtok,
            )
            for r in data.rates
        ]
    )
    log.info(
        "event=rate_card_version_added rate_card_id=%s version_id=%s effective_from=%s",
        card_id,
        version.id,
        effective_from.isoformat(),
    )


async def create_rate_card(session: AsyncSession, data: RateCardCreate) -> RateCardOut:
    repository = RateCardRepository(session)
    if await repository.card_named(data.name) is not None:
        raise RateCardExists(f"a rate card named {data.name!r} exists", param="body.name")
    card = RateCard(name=data.name, description=data.description)
    await repository.add(card)
    await _add_version(repository, card.id, data)
    return (await _cards_out(repository, [card]))[0]


async def add_version(
    session: AsyncSession, card_id: int, data: RateCardVersionCreate
) -> RateCardOut:
    repository = RateCardRepository(session)
    card = await repository.card(card_id)
    if card is None:
        raise _card_not_found(card_id)
    await _add_version(repository, card_id, data)
    return (await _cards_out(repository, [card]))[0]


async def assign(
    session: AsyncSession,
    account_id: uuid.UUID,
    card_id: int | None,
    effective_from: datetime | None,
) -> AccountRateCard:
    """From `effective_from` (default now) on, the account pays by `card_id` (None: list
    prices). The history is kept: earlier assignments stay."""
    repository = RateCardRepository(session)
    if card_id is not None and await repository.card(card_id) is None:
        raise _card_not_found(card_id, "body.rate_card_id")
    at = (effective_from or datetime.now(UTC)).astimezone(UTC)
    if await repository.assignment_at(account_id, at) is not None:
        raise AssignmentExists(
            f"account {account_id} has a rate-card assignment from {at.isoformat()} already",
            param="body.rate_card_effective_from",
        )
    assignment = AccountRateCard(account_id=account_id, rate_card_id=card_id, effective_from=at)
    await repository.add(assignment)
    log.info(
        "event=rate_card_assigned account_id=%s rate_card_id=%s effective_from=%s",
        account_id,
        card_id,
        at.isoformat(),
    )
    return assignment


async def assignments(session: AsyncSession, account_id: uuid.UUID) -> list[RateCardAssignmentOut]:
    rows = await RateCardRepository(session).assignments(account_id)
    return [RateCardAssignmentOut.model_validate(r) for r in rows]


async def rate_cards_now(
    session: AsyncSession, account_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, int | None]:
    """Each account's rate card in force now (absent: never assigned one)."""
    if not account_ids:
        return {}
    return await RateCardRepository(session).in_force(account_ids, datetime.now(UTC))
