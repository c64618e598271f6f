"""Queries of idempotency keys: claim one, read what it answered, store the answer."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert

from service.db.models import IdempotencyKey
from service.db.repository import Repository

K = IdempotencyKey


class IdempotencyRepository(Repository):
    async def claim(self, scope: str, key: str, request_hash: bytes) -> bool:
        """Whether this transaction now owns (`scope`, `key`).

        One statement, settled by the primary key: a concurrent claim of the same key waits
        on this row until this transaction ends, then claims nothing if it committed (and
        the key, if it rolled back). Nothing in Python decides who was first.
        """
        claimed = await self.session.scalars(
            pg_insert(K)
            .values(scope=scope, key=key, request_hash=request_hash)
            .on_conflict_do_nothing()
            .returning(K.key)
        )
        return claimed.first() is not None

    async def get(self, scope: str, key: str) -> IdempotencyKey | None:
        return await self.session.scalar(select(K).where(K.scope == scope, K.key == key))

    async def answer(self, scope: str, key: str, status_code: int, body: Any) -> None:
        await self.session.execute(
            update(K)
            .where(K.scope == scope, K.key == key)
            .values(status_code=status_code, response=body)
        )
