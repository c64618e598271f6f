"""What a running Meterline process holds: settings, the database, and the long-lived parts."""

from __future__ import annotations

import logging
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from service.auth.key_cache import KeyCache
from service.db.engine import asyncpg_dsn, create_engine, session_factory
from service.db.listener import Listener
from service.db.partitions import around, ensure_partitions
from service.invoices.rollup import roll_up_if_free, rollup_job
from service.ledger.writer import LedgerWriter
from service.lifecycle import Periodic
from service.limits.service import Limits
from service.metrics.sampler import LedgerSampler, observe_settlement
from service.prices.cache import PriceCache, seed_default_prices
from service.providers.router import ProviderRouter
from service.proxy.access import AccessLog
from service.proxy.context import Hook, ProxyHooks
from service.proxy.service import MeteringProxy
from service.proxy.setup import start_proxy
from service.proxy.upstream import UpstreamClient
from service.routing.service import ModelRouter, seed_stats
from service.routing.stats import RoutingStats
from service.settings import Settings
from service.tariff.service import load_tariff
from service.tasks.expiry import expiry_job
from service.tasks.guard import TaskGuard
from service.usage.cache import BreakdownCache
from service.usage.rollup import roll_up_daily
from service.webhooks.pending import PendingEvents
from service.webhooks.sender import WebhookSender

log = logging.getLogger("meterline.routing")


@dataclass
class Runtime:
    settings: Settings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    prices: PriceCache
    # The worker's one LISTEN connection, dispatching to the key directory and the tasks.
    listener: Listener
    # The metering proxy's long-lived parts (service/proxy, service/ledger).
    keys: KeyCache
    providers: ProviderRouter
    # Where requests go (model names and model objects) and the live statistics it ranks by.
    routing: ModelRouter
    routing_stats: RoutingStats
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
    # Fold newly recorded ledger rows into the usage rollups that invoices and reports read,
    # and close open quoted tasks past their deadline.
    jobs: list[Periodic]
    # Webhooks: events noticed on the hot path on their way to the outbox, and the sender
    # of due deliveries (None when `webhook_poll_interval_s` is 0).
    pending_events: PendingEvents
    webhooks: WebhookSender | None
    # Breakdowns read from the daily usage rollup (the console's overview), with their
    # watermark: a reload reads only the ledger rows recorded since.
    breakdowns: BreakdownCache
    # Closes every part started, in the reverse order of their start.
    _started: AsyncExitStack = field(repr=False)

    @classmethod
    async def start(cls, settings: Settings) -> Runtime:
        """Start every part; should one fail to start, those already started are closed, in
        the reverse order of their start."""
        if not settings.database_url:
            raise RuntimeError("database_url must be resolved before the app starts")
        started = AsyncExitStack()
        try:
            return await cls._start(settings, settings.database_url, started)
        except BaseException:
            await started.aclose()
            raise

    @classmethod
    async def _start(cls, settings: Settings, url: str, stack: AsyncExitStack) -> Runtime:
        dsn = asyncpg_dsn(url)
        engine = create_engine(url, settings.db_pool_size)
        stack.push_async_callback(engine.dispose)
        async with engine.begin() as connection:
            await ensure_partitions(connection, around(datetime.now(UTC)))
        sessions = session_factory(engine)
        await seed_default_prices(sessions)
        prices = PriceCache(sessions, load_tariff)
        await prices.start()
        stack.push_async_callback(prices.stop)
        # Everything that follows a channel subscribes before the connection opens, and
        # loads after it listens: no change falls between the load and the listening.
        listener = Listener(dsn)
        keys = KeyCache(engine, settings.key_cache_refresh_s, listener)
        # Stopped after the parts that offer to it (they close first): its last drain
        # writes what they noticed.
        pending_events = PendingEvents(sessions)
        pending_events.start()
        stack.push_async_callback(pending_events.stop)
        tasks = TaskGuard(
            dsn,
            settings.task_guard_refresh_s,
            settings.task_settle_window_s,
            listener=listener,
            events=pending_events,
        )
        limits = Limits.create(settings, engine, prices, keys.limits, listener, pending_events)
        webhooks = None
        if settings.webhook_poll_interval_s > 0:
            webhooks = WebhookSender(settings, sessions, listener)
        await listener.start()
        stack.push_async_callback(listener.close)
        if webhooks is not None:
            await webhooks.start()
            stack.push_async_callback(webhooks.stop)
        await keys.start()
        stack.push_async_callback(keys.stop)
        ledger = LedgerWriter(
            dsn,
            settings.spool_dir,
            settings.ledger_batch_size,
            settings.ledger_flush_interval_s,
            settings.ledger_queue_max,
        )
        # The sampler closes after the ledger drained, to count what the drain wrote.
        metrics = LedgerSampler(ledger)
        await metrics.start()
        stack.push_async_callback(metrics.stop)
        await ledger.start()
        stack.push_async_callback(ledger.close)
        parts = await start_proxy(
            settings, stack, keys=keys, ledger=ledger, prices=prices, sessions=sessions
        )
        hooks: ProxyHooks = parts["hooks"]
        limits.start()
        stack.push_async_callback(limits.stop)
        await tasks.start()
        stack.push_async_callback(tasks.stop)
        # In the order they run. Tasks first: a refused task must not hold budget or
        # rate-limit tokens, and a task's cost is counted before any other hook yields to
        # the next request.
        hooks.update(
            {
                "tasks": Hook(tasks.admit, tasks.settle),
                "limits": Hook(limits.admission, limits.settlement),
                "metrics": Hook(settle=observe_settlement),
            }
        )
        limits.cover_quoted_tasks(tasks.open_cost)
        routing: ModelRouter = parts["routing"]
        routing.follow_quotes(tasks.quoted_model)
        seeded = await seed_stats(routing.stats, sessions, datetime.now(UTC))
        log.info("event=routing_stats_seeded routes=%d", seeded)
        jobs = _jobs(settings, sessions, tasks)
        for job in jobs:
            await stack.enter_async_context(job)
        return cls(
            settings=settings,
            engine=engine,
            sessions=sessions,
            prices=prices,
            listener=listener,
            keys=keys,
            ledger=ledger,
            limits=limits,
            metrics=metrics,
            tasks=tasks,
            jobs=jobs,
            pending_events=pending_events,
            webhooks=webhooks,
            breakdowns=BreakdownCache(),
            _started=stack,
            **parts,
        )

    async def close(self) -> None:
        # In-flight requests are done (uvicorn waits for them): the jobs stop, then the
        # proxy's parts, the ledger drains, and the database goes last.
        await self._started.aclose()


def _jobs(
    settings: Settings, sessions: async_sessionmaker[AsyncSession], tasks: TaskGuard
) -> list[Periodic]:
    """The background jobs (an interval of 0 turns one off)."""
    jobs: list[Periodic] = []
    if settings.usage_rollup_interval_s > 0:
        interval = settings.usage_rollup_interval_s
        jobs.append(rollup_job("usage_rollup", sessions, interval, roll_up_if_free))
        jobs.append(rollup_job("usage_daily_rollup", sessions, interval, roll_up_daily))
    if settings.task_expiry_interval_s > 0:
        jobs.append(expiry_job(sessions, tasks, settings.task_expiry_interval_s))
    return jobs
