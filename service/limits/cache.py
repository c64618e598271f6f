"""The limits of every usable key and its account, in memory: admission never waits on Postgres.

Reloaded every `key_cache_refresh_s` (a changed tier, limit or budget applies within that
time); a key created since the last reload is loaded on its first request, then cached.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid

from sqlalchemy.ext.asyncio import AsyncEngine

from service.limits import repository
from service.limits.policy import KeyLimits

log = logging.getLogger("meterline.limits")

# A request never waits longer than this for a cache miss; it is then let through on the
# basic tier (the key itself was just authenticated, so the database is rarely the issue).
_MISS_TIMEOUT_S = 2.0


class LimitsCache:
    def __init__(self, engine: AsyncEngine, refresh_s: float) -> None:
        self._engine = engine
        self._refresh_s = refresh_s
        self._by_key: dict[uuid.UUID, KeyLimits] = {}
        self._pending: dict[uuid.UUID, asyncio.Future[KeyLimits | None]] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._refresh_forever(), name="limits-cache")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def refresh(self) -> None:
        async with self._engine.connect() as connection:
            rows = await repository.active_key_limits(connection)
        self._by_key = {row.key_id: row for row in rows}

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_s)
            try:
                await self.refresh()
            except Exception as exc:  # the database may be down; keep the last good limits
                log.warning("event=limits_refresh_failed error=%s", type(exc).__name__)

    async def get(self, key_id: uuid.UUID, account_id: uuid.UUID) -> KeyLimits:
        found = self._by_key.get(key_id)
        if found is not None:
            return found
        try:
            found = await asyncio.wait_for(self._load(key_id), _MISS_TIMEOUT_S)
        except Exception as exc:
            log.warning("event=limits_lookup_failed key_id=%s error=%s", key_id, type(exc).__name__)
            found = None
        return found or KeyLimits(key_id=key_id, account_id=account_id, tier="basic")

    async def _load(self, key_id: uuid.UUID) -> KeyLimits | None:
        pending = self._pending.get(key_id)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[KeyLimits | None] = asyncio.get_running_loop().create_future()
        self._pending[key_id] = future
        try:
            async with self._engine.connect() as connection:
                found = await repository.key_limits(connection, key_id)
            if found is not None:
                self._by_key[key_id] = found
            future.set_result(found)
            return found
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it, nobody logs it as lost
            raise
        finally:
            del self._pending[key_id]
