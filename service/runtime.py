"""What a running Meterline process holds: settings, the database, and the long-lived parts."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from service.auth.key_cache import KeyCache
from service.db.engine import asyncpg_dsn, create_engine, session_factory
from service.db.partitions import around, ensure_partitions
from service.invoices.rollup import RollupJob, roll_up_if_free
from service.ledger.writer import LedgerWriter
from service.limits.service import Limits
from service.metrics.sampler import LedgerSampler, observe_settlement
from service.prices.cache import PriceCache, seed_default_prices
from service.providers.router import ProviderRouter
from service.proxy.access import AccessLog
from service.proxy.context import Hook, ProxyHooks
from service.proxy.service import MeteringProxy
from service.proxy.setup import start_proxy
from service.proxy.upstream import UpstreamClient
from service.settings import Settings
from service.tasks.expiry import ExpiryJob
from service.tasks.guard import TaskGuard
from service.usage.rollup import roll_up_daily


@dataclass
class Runtime:
    settings: Settings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    prices: PriceCache
    # The metering proxy's long-lived parts (service/proxy, service/ledger).
    keys: KeyCache
    providers: ProviderRouter
    upstream: UpstreamClient
    ledger: LedgerWriter
    hooks: ProxyHooks
    proxy: MeteringProxy
    access_log: AccessLog | None
    # Rate limits and budgets (admission hooks), and the metrics fed by the running parts.
    limits: Limits
    metrics: LedgerSampler
    # Tasks: the in-memory view refusing requests on completed or capped tasks (admission).
    tasks: TaskGuard
    # Folds newly recorded ledger rows into the usage rollups that invoices and reports read.
    rollup: RollupJob
    # Closes open quoted tasks past their deadline.
    expiry: ExpiryJob

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
        parts = await start_proxy(settings, engine, prices)
        limits = Limits.create(settings, engine, prices)
        await limits.start()
        metrics = LedgerSampler(parts["ledger"])
        await metrics.start()
        tasks = TaskGuard(
            asyncpg_dsn(settings.database_url),
            settings.task_guard_refresh_s,
            settings.task_settle_window_s,
        )
        await tasks.start()
        # In the order they run. Tasks first: a refused task must not hold budget or
        # rate-limit tokens, and a task's cost is counted before any other hook yields to
        # the next request.
        parts["hooks"].update(
            {
                "tasks": Hook(tasks.admit, tasks.settle),
                "limits": Hook(limits.admission, limits.settlement),
                "metrics": Hook(settle=observe_settlement),
            }
        )
        limits.cover_quoted_tasks(tasks.open_cost)
        rollup = RollupJob(
            sessions, settings.usage_rollup_interval_s, (roll_up_if_free, roll_up_daily)
        )
        rollup.start()
        expiry = ExpiryJob(sessions, tasks, settings.task_expiry_interval_s)
        expiry.start()
        return cls(
            settings=settings,
            engine=engine,
            sessions=sessions,
            prices=prices,
            limits=limits,
            metrics=metrics,
            tasks=tasks,
            rollup=rollup,
            expiry=expiry,
            **parts,
        )

    async def close(self) -> None:
        # In-flight requests are done (uvicorn waits for them): drain the ledger last.
        await self.upstream.close()
        await self.keys.stop()
        await self.limits.stop()
        await self.ledger.close()
        if self.access_log is not None:
            self.access_log.close()
        await self.metrics.stop()
        await self.tasks.stop()
        await self.rollup.stop()
        await self.expiry.stop()
        await self.prices.stop()
        await self.engine.dispose()
