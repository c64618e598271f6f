from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from pricing.prices import Price
from service.db.models import ProviderCostVersion
from service.db.repository import Repository
from service.prices.repository import to_price


class ProviderCostRepository(Repository):
    async def all_costs(self) -> dict[str, list[Price]]:
        """Every version, per provider."""
        costs: dict[str, list[Price]] = {}
        for row in await self.session.scalars(select(ProviderCostVersion)):
            costs.setdefault(row.provider, []).append(to_price(row))
        return costs

    async def versions(
        self, provider: str | None = None, model: str | None = None
    ) -> list[ProviderCostVersion]:
        """Stored versions by provider, model then start; optionally of one provider or model."""
        C = ProviderCostVersion
        statement = select(C).order_by(C.provider, C.model, C.effective_from)
        if provider is not None:
            statement = statement.where(C.provider == provider)
        if model is not None:
            statement = statement.where(C.model == model)
        return list(await self.session.scalars(statement))

    async def insert_missing(self, provider: str, costs: list[Price], source: str) -> int:
        """Insert versions not already present (same provider, model and start)."""
        if not costs:
            return 0
        statement = (
            insert(ProviderCostVersion)
            .values([{**_values(p), "provider": provider, "source": source} for p in costs])
            .on_conflict_do_nothing(index_elements=["provider", "model", "effective_from"])
            .returning(ProviderCostVersion.id)
        )
        return len((await self.session.scalars(statement)).all())


def _values(price: Price) -> dict[str, object]:
    return {
        "model": price.model,
        "input_usd_per_mtok": price.input_usd_per_mtok,
        "output_usd_per_mtok": price.output_usd_per_mtok,
        "cached_input_usd_per_mtok": price.cached_input_usd_per_mtok,
        "effective_from": price.effective_from,
    }


class ProviderCostStore(Repository):
    """One provider's versions, as `service.prices.service.import_versions` adds them."""

    def __init__(self, session: AsyncSession, provider: str) -> None:
        super().__init__(session)
        self.provider = provider

    async def find(self, model: str, effective_from: datetime) -> ProviderCostVersion | None:
        C = ProviderCostVersion
        version: ProviderCostVersion | None = await self.session.scalar(
            select(C).where(
                C.provider == self.provider, C.model == model, C.effective_from == effective_from
            )
        )
        return version

    async def add(self, price: Price, source: str) -> ProviderCostVersion:
        version = ProviderCostVersion(**_values(price), provider=self.provider, source=source)
        self.session.add(version)
        await self.session.flush()
        await self.session.refresh(version)
        return version
