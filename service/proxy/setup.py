"""Start the proxy's long-lived parts for `Runtime` (service/runtime.py)."""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from service.auth.key_cache import KeyCache
from service.db.engine import asyncpg_dsn
from service.ledger.writer import LedgerWriter
from service.prices.cache import PriceCache
from service.providers.config import load_providers
from service.providers.router import ProviderRouter
from service.proxy.access import AccessLog
from service.proxy.context import ProxyHooks
from service.proxy.service import MeteringProxy
from service.proxy.upstream import UpstreamClient
from service.settings import Settings
from service.tokens import estimate


async def start_proxy(
    settings: Settings, engine: AsyncEngine, prices: PriceCache
) -> dict[str, Any]:
    """The Runtime fields of the proxy, started: keys, ledger writer, upstream client, …"""
    dsn = asyncpg_dsn(settings.database_url or "")
    await asyncio.to_thread(estimate.warm_up)
    keys = KeyCache(engine, dsn, settings.key_cache_refresh_s)
    await keys.start()
    ledger = LedgerWriter(
        dsn,
        settings.spool_dir,
        settings.ledger_batch_size,
        settings.ledger_flush_interval_s,
        settings.ledger_queue_max,
    )
    await ledger.start()
    upstream = UpstreamClient(
        settings.upstream_connect_timeout_s,
        settings.upstream_read_timeout_s,
        settings.upstream_connect_retries,
    )
    await upstream.start()
    providers = ProviderRouter(load_providers(settings.providers))
    hooks: ProxyHooks = {}  # declared by service/runtime.py once their parts have started
    access_log = AccessLog() if settings.access_log else None
    if access_log is not None:
        access_log.start()
    proxy = MeteringProxy(
        keys=keys,
        router=providers,
        upstream=upstream,
        ledger=ledger,
        prices=prices,
        hooks=hooks,
        max_body_bytes=settings.max_request_body_bytes,
        access_log=access_log,
    )
    return {
        "keys": keys,
        "providers": providers,
        "upstream": upstream,
        "ledger": ledger,
        "hooks": hooks,
        "proxy": proxy,
        "access_log": access_log,
    }
