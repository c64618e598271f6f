from __future__ import annotations

from importlib.resources import files

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from pricing.prices import Price, parse_list_prices
from service.db.models import PriceVersion


def default_prices() -> list[Price]:
    """Hyperbolic's published list, shipped inside the `pricing` package."""
    text = files("pricing").joinpath("data/hyperbolic-list-prices.csv").read_text()
    return parse_list_prices(text)


def to_price(row: PriceVersion) -> Price:
    return Price(
        model=row.model,
        input_usd_per_mtok=row.input_usd_per_mtok,
        output_usd_per_mtok=row.output_usd_per_mtok,
        cached_input_usd_per_mtok=row.cached_input_usd_per_mtok,
        effective_from=row.effective_from,
        version_id=row.id,
    )


class PriceRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

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
