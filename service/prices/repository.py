from __future__ import annotations

from datetime import datetime
from importlib.resources import files

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert

from pricing.prices import Price, parse_list_prices
from service.db.models import PriceVersion, ProviderCostVersion
from service.db.repository import Repository


def default_prices() -> list[Price]:
    """Hyperbolic's published list, shipped inside the `pricing` package."""
    text = files("pricing").joinpath("data/hyperbolic-list-prices.csv").read_text()
    return parse_list_prices(text)


def to_price(row: PriceVersion | ProviderCostVersion) -> Price:
    """A stored version as the pure library reads it (a provider cost has a price's shape)."""
    return Price(
        model=row.model,
        input_usd_per_mtok=row.input_usd_per_mtok,
        output_usd_per_mtok=row.output_usd_per_mtok,
        cached_input_usd_per_mtok=row.cached_input_usd_per_mtok,
        effective_from=row.effective_from,
        version_id=row.id,
    )


class PriceRepository(Repository):
    async def all_prices(self) -> list[Price]:
        rows = await self.session.scalars(select(PriceVersion))
        return [to_price(row) for row in rows]

    async def insert_missing(self, prices: list[Price], source: str) -> int:
        """Insert versions not already present (same model and start); returns how many."""
        if not prices:
            return 0
        statement = (
            insert(PriceVersion)
            .values(
                [
                    {
                        "model": p.model,
                        "input_usd_per_mtok": p.input_usd_per_mtok,
                        "output_usd_per_mtok": p.output_usd_per_mtok,
                        "cached_input_usd_per_mtok": p.cached_input_usd_per_mtok,
                        "effective_from": p.effective_from,
                        "source": source,
                    }
                    for p in prices
                ]
            )
            .on_conflict_do_nothing(index_elements=["model", "effective_from"])
            .returning(PriceVersion.id)
        )
        return len((await self.session.scalars(statement)).all())

    async def is_empty(self) -> bool:
        return await self.session.scalar(select(PriceVersion.id).limit(1)) is None

    async def versions(
        self, model: str | None = None, ids: list[int] | None = None
    ) -> list[PriceVersion]:
        """Stored versions, by model then start; optionally of one model id or pattern."""
        statement = select(PriceVersion).order_by(PriceVersion.model, PriceVersion.effective_from)
        if model is not None:
            statement = statement.where(PriceVersion.model == model)
        if ids is not None:
            statement = statement.where(PriceVersion.id.in_(ids))
        return list(await self.session.scalars(statement))

    async def find(self, model: str, effective_from: datetime) -> PriceVersion | None:
        version: PriceVersion | None = await self.session.scalar(
            select(PriceVersion).where(
                PriceVersion.model == model, PriceVersion.effective_from == effective_from
            )
        )
        return version

    async def add(self, price: Price, source: str) -> PriceVersion:
        version = PriceVersion(
            model=price.model,
            input_usd_per_mtok=price.input_usd_per_mtok,
            output_usd_per_mtok=price.output_usd_per_mtok,
            cached_input_usd_per_mtok=price.cached_input_usd_per_mtok,
            effective_from=price.effective_from,
            source=source,
        )
        self.session.add(version)
        await self.session.flush()
        await self.session.refresh(version)
        return version
