"""The price book and the whole tariff held in memory, so pricing a request never waits on
the database."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from pricing.prices import PriceBook
from pricing.rate_cards import Tariff
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
    """The list `PriceBook` and the whole `Tariff` (provider costs, rate cards and their
    assignments), refreshed from Postgres every `interval` seconds (and on demand)."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        load: Callable[[AsyncSession], Awaitable[Tariff]],
        interval: float = 2.0,
    ) -> None:
        # `load` is `service.tariff.service.load_tariff`, handed in by the composition root:
        # the tariff's packages build on this one.
        self._sessions = sessions
        self._load = load
        self.book = PriceBook([])
        self.tariff = Tariff(self.book)
        # The database may be down; the last good book stays.
        self._refresher = Periodic("price_refresh", interval, self.refresh, log)

    async def refresh(self) -> None:
        async with self._sessions() as session:
            tariff = await self._load(session)
        # One assignment each: a reader sees the book of its tariff, never another's.
        self.tariff, self.book = tariff, tariff.list_prices

    async def start(self) -> None:
        await self.refresh()
        self._refresher.start()

    async def stop(self) -> None:
        await self._refresher.stop()
