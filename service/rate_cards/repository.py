from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import ARRAY, any_, bindparam, select
from sqlalchemy.dialects.postgresql import UUID

from pricing.prices import BEGINNING_OF_TIME, Price
from pricing.rate_cards import RateCardAssignment, RateCardTerms
from service.db.models import (
    AccountRateCard,
    RateCard,
    RateCardRate,
    RateCardVersion,
)
from service.db.repository import Repository


def to_rate(row: RateCardRate) -> Price:
    return Price(
        model=row.model,
        input_usd_per_mtok=row.input_usd_per_mtok,
        output_usd_per_mtok=row.output_usd_per_mtok,
        cached_input_usd_per_mtok=row.cached_input_usd_per_mtok,
        effective_from=BEGINNING_OF_TIME,
    )


class RateCardRepository(Repository):
    async def cards(self, ids: Sequence[int] | None = None) -> list[RateCard]:
        statement = select(RateCard).order_by(RateCard.id)
        if ids is not None:
            statement = statement.where(RateCard.id.in_(list(ids)))
        return list(await self.session.scalars(statement))

    async def card(self, card_id: int) -> RateCard | None:
        return await self.session.get(RateCard, card_id)

    async def card_named(self, name: str) -> RateCard | None:
        card: RateCard | None = await self.session.scalar(
            select(RateCard).where(RateCard.name == name)
        )
        return card

    async def versions(
        self, card_ids: Sequence[int] | None = None
    ) -> list[tuple[RateCardVersion, list[RateCardRate]]]:
        """Versions (of these cards, or all) oldest first, each with its explicit rates."""
        statement = select(RateCardVersion).order_by(
            RateCardVersion.rate_card_id, RateCardVersion.effective_from
        )
        if card_ids is not None:
            statement = statement.where(RateCardVersion.rate_card_id.in_(list(card_ids)))
        versions = list(await self.session.scalars(statement))
        rates: dict[int, list[RateCardRate]] = {v.id: [] for v in versions}
        if versions:
            rows = await self.session.scalars(
                select(RateCardRate)
                .where(RateCardRate.version_id.in_(list(rates)))
                .order_by(RateCardRate.model)
            )
            for row in rows:
                rates[row.version_id].append(row)
        return [(v, rates[v.id]) for v in versions]

    async def version_at(self, card_id: int, effective_from: datetime) -> RateCardVersion | None:
        version: RateCardVersion | None = await self.session.scalar(
            select(RateCardVersion).where(
                RateCardVersion.rate_card_id == card_id,
                RateCardVersion.effective_from == effective_from,
            )
        )
        return version

    async def add(self, obj: RateCard | RateCardVersion | AccountRateCard) -> None:
        self.session.add(obj)
        await self.session.flush()
        await self.session.refresh(obj)

    async def add_rates(self, rates: list[RateCardRate]) -> None:
        self.session.add_all(rates)
        await self.session.flush()

    async def assignments(self, account_id: uuid.UUID | None = None) -> list[AccountRateCard]:
        """Assignments (of one account, or all), oldest first."""
        statement = select(AccountRateCard).order_by(
            AccountRateCard.account_id, AccountRateCard.effective_from
        )
        if account_id is not None:
            statement = statement.where(AccountRateCard.account_id == account_id)
        return list(await self.session.scalars(statement))

    async def assignment_at(
        self, account_id: uuid.UUID, effective_from: datetime
    ) -> AccountRateCard | None:
        found: AccountRateCard | None = await self.session.scalar(
            select(AccountRateCard).where(
                AccountRateCard.account_id == account_id,
                AccountRateCard.effective_from == effective_from,
            )
        )
        return found

    async def in_force(
        self, account_ids: Sequence[uuid.UUID], at: datetime
    ) -> dict[uuid.UUID, int | None]:
        """Each account's rate card at `at` (accounts never assigned one are left out)."""
        A = AccountRateCard
        rows = await self.session.execute(
            select(A.account_id, A.rate_card_id)
            .distinct(A.account_id)
            .where(
                A.account_id
                == any_(bindparam("ids", list(account_ids), type_=ARRAY(UUID(as_uuid=True)))),
                A.effective_from <= at,
            )
            .order_by(A.account_id, A.effective_from.desc())
        )
        return {r.account_id: r.rate_card_id for r in rows}

    async def terms(self) -> tuple[list[RateCardTerms], list[RateCardAssignment]]:
        """Every rate-card version and every assignment, as the pure tariff reads them."""
        terms = [
            RateCardTerms(
                rate_card_id=v.rate_card_id,
                effective_from=v.effective_from,
                markup_pct=v.markup_pct,
                markup_basis=v.markup_basis,
                rates=tuple(to_rate(r) for r in rates),
                version_id=v.id,
            )
            for v, rates in await self.versions()
        ]
        assignments = [
            RateCardAssignment(a.account_id, a.rate_card_id, a.effective_from)
            for a in await self.assignments()
        ]
        return terms, assignments
