"""The price book held in memory, so pricing a request never waits on the database."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from pricing.prices import PriceBook
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
        self._interval = interval
        self.book = PriceBook([])
        self._task: asyncio.Task[None] | None = None

    async def refresh(self) -> None:
        async with self._sessions() as session:
            self.book = PriceBook(await PriceRepository(session).all_prices())

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._refresh_forever(), name="price-cache")

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.refresh()
            except Exception as exc:  # the database may be down; keep the last good book
                log.warning("event=price_refresh_failed error=%s", type(exc).__name__)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
