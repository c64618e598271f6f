"""Routing statistics shared by every worker and replica through Redis, at a bounded cost.

No request waits on Redis: every `interval` seconds each worker writes its own figures
(one hash field under its id) and reads all the others' in one pipelined round trip, then
routes by their merge (service/routing/stats.py). Each worker merges the same published
figures in the same order, so two workers see the same statistics within two intervals
of the last attempt. A worker that stopped publishing drops out after `STALE_S`.
"""

from __future__ import annotations

import logging
import time

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from service.lifecycle import Periodic
from service.routing.stats import RouteFigures, RouteKey, RoutingStats, merge

log = logging.getLogger("meterline.routing")

STALE_S = 10.0


class StatsExchange:
    def __init__(self, stats: RoutingStats, redis_url: str, prefix: str, interval: float) -> None:
        self.stats = stats
        self.worker = stats.worker
        self._key = f"{prefix}routing:stats"
        # Short timeouts: a slow Redis only delays the next merge, it never holds a request.
        self._redis = Redis.from_url(redis_url, socket_timeout=0.5, socket_connect_timeout=0.5)
        self._job = Periodic("routing_stats_sync", interval, self.sync, log)

    def start(self) -> None:
        self.stats.shared = True
        self._job.start()

    async def stop(self) -> None:
        await self._job.stop()
        try:
            await self._redis.hdel(self._key, self.worker)  # its figures leave with it
        except (RedisError, OSError) as exc:
            log.info("event=routing_stats_unpublished error=%s", type(exc).__name__)
        finally:
            await self._redis.aclose()

    async def sync(self) -> None:
        now = time.time()
        routes = [
            [provider, model, f.samples, f.error_rate, f.ttft_ms, f.latency_ms, f.updated]
            for (provider, model), f in list(self.stats.local.items())
        ]
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hset(self._key, self.worker, orjson.dumps({"at": now, "routes": routes}))
            pipe.expire(self._key, int(STALE_S * 6))
            pipe.hgetall(self._key)
            *_, published = await pipe.execute()
        parts: dict[RouteKey, list[RouteFigures]] = {}
        stale = []
        for worker in sorted(published):
            data = orjson.loads(published[worker])
            if now - float(data["at"]) > STALE_S:
                stale.append(worker)
                continue
            for provider, model, samples, error, ttft, latency, updated in data["routes"]:
                figures = RouteFigures(samples, error, ttft, latency, updated)
                parts.setdefault((provider, model), []).append(figures)
        self.stats.replace_view({key: merge(figures) for key, figures in sorted(parts.items())})
        if stale:
            await self._redis.hdel(self._key, *stale)
