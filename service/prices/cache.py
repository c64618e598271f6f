"""The price book held in memory, so pricing a request never waits on the database."""

from __future__ import annotations

import logging

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from pricing.prices import PriceBook
from service.lifecycle import Periodic
from service.prices.repository import PriceRepository, default_prices

log = logging.getLogger("meterline.prices")


async def seed_default_prices(sessions: async_sessionmaker[AsyncSession]) -> None:
    """Load the shipped price list on first start (an empty price table)."""
    async with sessions() as session, session.begin():
        repository = PriceRepository(session)
        if await repository.is_empty():
            added = await repository.insert_missing(default_prices(), source="default")
            log.info("event=default_prices_loaded versions=%d", added)


class PriceCache:
    """A `PriceBook` refreshed from Postgres every `interval` seconds (and on demand)."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], interval: float = 2.0) -> None:
        self._sessions = sessions
        self.book = PriceBook([])
        # The database may be down; the last good book stays.
        self._refresher = Periodic("price_refresh", interval, self.refresh, log)

    async def refresh(self) -> None:
        async with self._sessions() as session:
            self.book = PriceBook(await PriceRepository(session).all_prices())

    async def start(self) -> None:
        await self.refresh()
        self._refresher.start()

    async def stop(self) -> None:
        await self._refresher.stop()
