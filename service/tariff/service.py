"""The tariff read from the database: everything that prices usage, at once."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from pricing.prices import PriceBook
from pricing.rate_cards import Tariff
from service.prices.repository import PriceRepository
from service.provider_costs.service import cost_books
from service.rate_cards.repository import RateCardRepository


async def load_tariff(session: AsyncSession) -> Tariff:
    """List prices, provider costs, rate cards and their assignments, as they stand now."""
    terms, assignments = await RateCardRepository(session).terms()
    return Tariff(
        PriceBook(await PriceRepository(session).all_prices()),
        await cost_books(session),
        terms,
        assignments,
    )
