"""The key directory: every usable customer key in memory, with its limits, so neither
authenticating nor admitting a proxied request waits on Postgres.

The directory holds every usable key (service/auth/usability.py) by its SHA-256 and by its
id, each with the limits of the key and of its account, from one query reloaded every
`key_cache_refresh_s` (a changed tier, limit or budget applies within that time). A
revocation is seen at once: the billing API's revoke sends a notification on
`Channel.KEYS` in its transaction, and the worker's listening connection drops the key
the moment that transaction commits. A key created since the last reload is found by a
one-row query on its first request (then held), and unknown keys are remembered briefly
so a stream of bad keys cannot hammer the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from service.auth import repository
from service.auth.keys import hash_key, looks_like_key
from service.auth.usability import key_usable
from service.db.channels import Channel
from service.db.engine import database_unavailable
from service.db.listener import Listener
from service.errors import DatabaseUnavailable
from service.lifecycle import Periodic

log = logging.getLogger("meterline.keys")

_NEGATIVE_TTL_S = 2.0
_NEGATIVE_LIMIT = 10_000
# Admission never waits longer than this for the limits of a key the directory lost since
# its authentication (revoked in between); it then goes on the basic tier.
_LIMITS_TIMEOUT_S = 2.0


@dataclass(frozen=True, slots=True)
class KeyLimits:
    """What the database says about the limits of one key and its account."""

    key_id: uuid.UUID
    account_id: uuid.UUID
    tier: str
    account_rpm: int | None = None
    account_tpm: int | None = None
    account_budget_usd: Decimal | None = None
    key_rpm: int | None = None
    key_tpm: int | None = None
    key_budget_usd: Decimal | None = None
    # A prepaid account: every request is paid from its credits (service/credits).
    prepaid: bool = False


@dataclass(frozen=True, slots=True)
class CachedKey:
    key_id: uuid.UUID
    account_id: uuid.UUID
    expires_at: datetime | None
    prefix: str  # what lists (and the access log) show of the key
    limits: KeyLimits

    def usable(self, now: datetime) -> bool:
        # Held keys are never revoked (a revocation drops them); they may have expired.
        return key_usable(None, self.expires_at, now)


def _entry(row: Any) -> CachedKey:
    limits = KeyLimits(
        key_id=row.key_id,
        account_id=row.account_id,
        tier=row.tier,
        account_rpm=row.account_rpm,
        account_tpm=row.account_tpm,
        account_budget_usd=row.account_budget_usd,
        key_rpm=row.key_rpm,
        key_tpm=row.key_tpm,
        key_budget_usd=row.key_budget_usd,
        prepaid=row.prepaid,
    )
    return CachedKey(row.key_id, row.account_id, row.expires_at, row.prefix, limits)


class KeyCache:
    def __init__(self, engine: AsyncEngine, refresh_s: float, listener: Listener) -> None:
        self._engine = engine
        self._by_hash: dict[bytes, CachedKey] = {}
        self._by_id: dict[uuid.UUID, CachedKey] = {}
        self._unknown: dict[bytes, float] = {}  # hash → monotonic time it stops being "unknown"
        self._revoked: set[uuid.UUID] = set()  # seen through NOTIFY; never usable again
        self._loading: dict[Hashable, asyncio.Future[CachedKey | None]] = {}
        self._refresher = Periodic("key_refresh", refresh_s, self.refresh, log)
        # A (re)opened connection may have missed revocations: reload at once.
        listener.subscribe(Channel.KEYS, self._on_notify, self._refresher.wake)

    def __len__(self) -> int:
        return len(self._by_hash)

    async def start(self) -> None:
        await self.refresh()
        self._refresher.start()

    async def stop(self) -> None:
        await self._refresher.stop()

    async def refresh(self) -> None:
        async with self._engine.connect() as connection:
            rows = await repository.usable_keys(connection)
        held = [
            (bytes(row.key_hash), _entry(row)) for row in rows if row.key_id not in self._revoked
        ]
        self._by_hash = dict(held)
        self._by_id = {entry.key_id: entry for _, entry in held}

    async def lookup(self, token: str) -> CachedKey | None:
        """The usable key `token` is, or None (unknown, revoked or expired)."""
        if not looks_like_key(token):
            return None
        digest = hash_key(token)
        found = self._by_hash.get(digest)
        if found is None:
            found = await self._load_by_hash(digest)
        if found is None or not found.usable(datetime.now(UTC)):
            return None
        return found

    async def limits(self, key_id: uuid.UUID, account_id: uuid.UUID) -> KeyLimits:
        """The limits of an authenticated key and its account."""
        found = self._by_id.get(key_id)
        if found is None:
            try:
                found = await asyncio.wait_for(self._load_by_id(key_id), _LIMITS_TIMEOUT_S)
            except Exception as exc:
                log.warning(
                    "event=limits_lookup_failed key_id=%s error=%s", key_id, type(exc).__name__
                )
        if found is None:
            return KeyLimits(key_id=key_id, account_id=account_id, tier="basic")
        return found.limits

    def revoke(self, key_id: uuid.UUID) -> None:
        """Forget a key at once (the NOTIFY path); a later reload cannot bring it back."""
        self._revoked.add(key_id)
        self._by_hash = {h: k for h, k in self._by_hash.items() if k.key_id != key_id}
        self._by_id.pop(key_id, None)

    def _on_notify(self, payload: str) -> None:
        # A payload that is not a key id is some other change: the reload below picks it up.
        with contextlib.suppress(ValueError):
            self.revoke(uuid.UUID(payload))
        self._unknown.clear()
        self._refresher.wake()

    # -- a key not held yet ---------------------------------------------------------

    async def _load_by_hash(self, digest: bytes) -> CachedKey | None:
        until = self._unknown.get(digest)
        if until is not None and until > time.monotonic():
            return None
        found = await self._once(digest, lambda: self._query(repository.key_by_hash, digest))
        if found is None:
            if len(self._unknown) >= _NEGATIVE_LIMIT:
                self._unknown.clear()
            self._unknown[digest] = time.monotonic() + _NEGATIVE_TTL_S
        return found

    async def _load_by_id(self, key_id: uuid.UUID) -> CachedKey | None:
        # Whatever its state: an admitted request is counted by its key's limits.
        return await self._once(key_id, lambda: self._query(repository.key_by_id, key_id, True))

    async def _query(
        self,
        find: Callable[[AsyncConnection, Any], Awaitable[repository.DirectoryRow | None]],
        value: bytes | uuid.UUID,
        even_unusable: bool = False,
    ) -> CachedKey | None:
        try:
            async with self._engine.connect() as connection:
                row = await find(connection, value)
        except Exception as exc:
            # A key not seen yet cannot be checked: a retryable 503, not a 500. Held keys
            # are served from memory all through the outage.
            if database_unavailable(exc):
                raise DatabaseUnavailable("cannot check this key now; retry shortly") from None
            raise
        if row is None:
            return None
        entry = _entry(row)
        usable = row.key_id not in self._revoked and key_usable(
            row.revoked_at, row.expires_at, datetime.now(UTC)
        )
        if usable:
            self._by_hash[bytes(row.key_hash)] = entry
            self._by_id[entry.key_id] = entry
        return entry if usable or even_unusable else None

    async def _once(
        self, token: Hashable, load: Callable[[], Awaitable[CachedKey | None]]
    ) -> CachedKey | None:
        """One query per missing key, however many requests wait for it at once."""
        pending = self._loading.get(token)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[CachedKey | None] = asyncio.get_running_loop().create_future()
        self._loading[token] = future
        try:
            found = await load()
            future.set_result(found)
            return found
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it, nobody logs it as lost
            raise
        finally:
            del self._loading[token]
