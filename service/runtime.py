"""What a running Meterline process holds: settings, the database, and the long-lived parts."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from starlette.requests import Request

from service.db.engine import create_engine, session_factory
from service.db.partitions import around, ensure_partitions
from service.prices.cache import PriceCache, seed_default_prices
from service.settings import Settings


@dataclass
class Runtime:
    settings: Settings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    prices: PriceCache

    @classmethod
    async def start(cls, settings: Settings) -> Runtime:
        if not settings.database_url:
            raise RuntimeError("database_url must be resolved before the app starts")
        engine = create_engine(settings.database_url, settings.db_pool_size)
        async with engine.begin() as connection:
            await ensure_partitions(connection, around(datetime.now(UTC)))
        sessions = session_factory(engine)
        await seed_default_prices(sessions)
        prices = PriceCache(sessions)
        await prices.start()
        return cls(settings=settings, engine=engine, sessions=sessions, prices=prices)

    async def close(self) -> None:
        await self.prices.stop()
        await self.engine.dispose()


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime
