"""Start the proxy's long-lived parts for `Runtime` (service/runtime.py)."""

from __future__ import annotations

import logging
from contextlib import AsyncExitStack
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.auth.key_cache import KeyCache
from service.ledger.writer import LedgerWriter
from service.lifecycle import Periodic
from service.prices.cache import PriceCache
from service.provider_costs.service import seed_provider_costs
from service.providers.config import load_providers
from service.providers.router import ProviderRouter
from service.proxy.access import AccessLog
from service.proxy.context import ProxyHooks
from service.proxy.service import MeteringProxy
from service.proxy.stream import StreamBounds
from service.proxy.upstream import UpstreamClient
from service.routing.service import ModelRouter
from service.routing.stats import RoutingStats
from service.settings import Settings

_LISTING_S = 60.0
log = logging.getLogger("meterline.routing")


async def _list_models(proxy: MeteringProxy) -> None:
    proxy.routing.listed_models = tuple(str(m["id"]) for m in await proxy.model_list.data())


async def start_proxy(
    settings: Settings,
    stack: AsyncExitStack,
    *,
    keys: KeyCache,
    ledger: LedgerWriter,
    prices: PriceCache,
    sessions: async_sessionmaker[AsyncSession],
) -> dict[str, Any]:
    """The Runtime fields of the proxy, started, each closed by `stack`: upstream client, …"""
    upstream = UpstreamClient(
        settings.upstream_connect_timeout_s,
        settings.upstream_read_timeout_s,
        settings.upstream_connect_retries,
    )
    await upstream.start()
    stack.push_async_callback(upstream.close)
    configs = load_providers(settings.providers)
    # The providers file's default cost tables, stored before the first request is priced.
    await seed_provider_costs(sessions, configs)
    await prices.refresh()
    providers = ProviderRouter(configs)
    stats = RoutingStats(settings.routing_cooldown_failures, settings.routing_cooldown_s)
    routing = ModelRouter(providers, prices, stats, settings.routing_max_attempts)
    if settings.redis_url:
        # Redis's client is imported only when it is used (5.8 MB a worker).
        from service.routing.sharing import StatsExchange

        exchange = StatsExchange(
            stats, settings.redis_url, settings.redis_prefix, settings.routing_stats_sync_s
        )
        exchange.start()
        stack.push_async_callback(exchange.stop)
    hooks: ProxyHooks = {}  # declared by service/runtime.py once their parts have started
    access_log = AccessLog() if settings.access_log else None
    if access_log is not None:
        access_log.start()
        stack.callback(access_log.close)
    proxy = MeteringProxy(
        keys=keys,
        routing=routing,
        upstream=upstream,
        ledger=ledger,
        hooks=hooks,
        max_body_bytes=settings.max_request_body_bytes,
        body_timeout_s=settings.client_body_timeout_s,
        stream_bounds=StreamBounds(
            settings.stream_max_duration_s,
            settings.stream_max_line_bytes,
            settings.upstream_read_timeout_s,
        ),
        key_headers=settings.key_headers,
        access_log=access_log,
        deadline_s=settings.routing_deadline_s,
    )
    # The concrete models behind the providers' patterns, for model objects without `llms`.
    listing = Periodic("routing_model_listing", _LISTING_S, lambda: _list_models(proxy), log)
    listing.start()
    listing.wake()
    stack.push_async_callback(listing.stop)
    return {
        "routing": routing,
        "routing_stats": stats,
        "providers": providers,
        "upstream": upstream,
        "hooks": hooks,
        "proxy": proxy,
        "access_log": access_log,
    }
