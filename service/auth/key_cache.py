"""Customer keys held in memory, so authenticating a proxied request never waits on Postgres.

The cache holds every usable key (not revoked, not expired at load) by its SHA-256 and is
reloaded every `key_cache_refresh_s`. A revocation is seen at once: the billing API's
revoke runs `SELECT pg_notify('meterline_keys', '<key_id>')` in its transaction, and a
LISTEN connection here drops the key the moment that transaction commits. A key created
since the last reload is found by a one-row query on the first miss (then cached), and
unknown keys are remembered briefly so a stream of bad keys cannot hammer the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from service.auth.keys import hash_key, looks_like_key
from service.db.engine import database_unavailable
from service.errors import DatabaseUnavailable

log = logging.getLogger("meterline.keys")

CHANNEL = "meterline_keys"
_NEGATIVE_TTL_S = 2.0
_NEGATIVE_LIMIT = 10_000

_ACTIVE_KEYS = text(
    "SELECT id, account_id, prefix, key_hash, expires_at FROM api_keys "
    "WHERE revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now())"
)
_ONE_KEY = text(
    "SELECT id, account_id, prefix, key_hash, expires_at, revoked_at FROM api_keys "
    "WHERE key_hash = :h"
)


@dataclass(frozen=True, slots=True)
class CachedKey:
    key_id: uuid.UUID
    account_id: uuid.UUID
    expires_at: datetime | None
    prefix: str  # what lists (and the access log) show of the key

    def usable(self, now: datetime) -> bool:
        return self.expires_at is None or self.expires_at > now


class KeyCache:
    def __init__(self, engine: AsyncEngine, dsn: str, refresh_s: float) -> None:
        self._engine = engine
        self._dsn = dsn
        self._refresh_s = refresh_s
        self._by_hash: dict[bytes, CachedKey] = {}
        self._unknown: dict[bytes, float] = {}  # hash → monotonic time it stops being "unknown"
        self._revoked: set[uuid.UUID] = set()  # seen through NOTIFY; never usable again
        self._pending: dict[bytes, asyncio.Future[CachedKey | None]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._listener: asyncpg.Connection | None = None
        self._wake = asyncio.Event()

    def __len__(self) -> int:
        return len(self._by_hash)

    async def start(self) -> None:
        await self.refresh()
        self._tasks = [
            asyncio.create_task(self._refresh_forever(), name="key-cache-refresh"),
            asyncio.create_task(self._listen_forever(), name="key-cache-listen"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.close(timeout=2)

    async def refresh(self) -> None:
        async with self._engine.connect() as connection:
            rows = (await connection.execute(_ACTIVE_KEYS)).all()
        self._by_hash = {
            bytes(row.key_hash): CachedKey(row.id, row.account_id, row.expires_at, row.prefix)
            for row in rows
            if row.id not in self._revoked
        }

    async def lookup(self, token: str) -> CachedKey | None:
        """The usable key `token` is, or None (unknown, revoked or expired)."""
        if not looks_like_key(token):
            return None
        digest = hash_key(token)
        found = self._by_hash.get(digest)
        if found is None:
            found = await self._load_missing(digest)
        if found is None or not found.usable(datetime.now(UTC)):
            return None
        return found

    async def _load_missing(self, digest: bytes) -> CachedKey | None:
        until = self._unknown.get(digest)
        if until is not None and until > time.monotonic():
            return None
        pending = self._pending.get(digest)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[CachedKey | None] = asyncio.get_running_loop().create_future()
        self._pending[digest] = future
        try:
            found = await self._query_one(digest)
            future.set_result(found)
            return found
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it, nobody logs it as lost
            raise
        finally:
            del self._pending[digest]

    async def _query_one(self, digest: bytes) -> CachedKey | None:
        try:
            async with self._engine.connect() as connection:
                row = (await connection.execute(_ONE_KEY, {"h": digest})).first()
        except Exception as exc:
            # A key not seen yet cannot be checked: a retryable 503, not a 500. Known keys
            # are served from memory all through the outage.
            if database_unavailable(exc):
                raise DatabaseUnavailable("cannot check this key now; retry shortly") from None
            raise
        if row is None or row.revoked_at is not None or row.id in self._revoked:
            if len(self._unknown) >= _NEGATIVE_LIMIT:
                self._unknown.clear()
            self._unknown[digest] = time.monotonic() + _NEGATIVE_TTL_S
            return None
        key = CachedKey(row.id, row.account_id, row.expires_at, row.prefix)
        self._by_hash[digest] = key
        return key

    def revoke(self, key_id: uuid.UUID) -> None:
        """Forget a key at once (the NOTIFY path); a later reload cannot bring it back."""
        self._revoked.add(key_id)
        self._by_hash = {h: k for h, k in self._by_hash.items() if k.key_id != key_id}

    def _on_notify(self, connection: Any, pid: int, channel: str, payload: str) -> None:
        # A payload that is not a key id is some other change: the reload below picks it up.
        with contextlib.suppress(ValueError):
            self.revoke(uuid.UUID(payload))
        self._unknown.clear()
        self._wake.set()

    async def _refresh_forever(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._refresh_s)
            self._wake.clear()
            try:
                await self.refresh()
            except Exception as exc:  # the database may be down; keep the last good keys
                log.warning("event=key_refresh_failed error=%s", type(exc).__name__)

    async def _listen_forever(self) -> None:
        while True:
            try:
                lost = asyncio.Event()
                self._listener = await asyncpg.connect(self._dsn, timeout=5)
                self._listener.add_termination_listener(lambda _, lost=lost: lost.set())
                await self._listener.add_listener(CHANNEL, self._on_notify)
                # Changes made while the listener was down were missed: reload now.
                self._wake.set()
                await lost.wait()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("event=key_listen_failed error=%s", type(exc).__name__)
            finally:
                if self._listener is not None and not self._listener.is_closed():
                    with contextlib.suppress(Exception):
                        await self._listener.close(timeout=2)
            await asyncio.sleep(1.0)
