"""Every query of the console's own: its sign-in sessions."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import delete, select

from service.db.models import ApiKey, ConsoleSession
from service.db.repository import Repository


class ConsoleSessionRepository(Repository):
    async def add(
        self,
        token_hash: bytes,
        csrf_token: str,
        expires_at: datetime,
        key_id: uuid.UUID | None,
        admin_token_hash: bytes | None,
    ) -> None:
        self.session.add(
            ConsoleSession(
                token_hash=token_hash,
                csrf_token=csrf_token,
                expires_at=expires_at,
                key_id=key_id,
                admin_token_hash=admin_token_hash,
            )
        )
        await self.session.flush()

    async def find(
        self, token_hash: bytes, now: datetime
    ) -> tuple[ConsoleSession, ApiKey | None] | None:
        """The unexpired session of a cookie, with its key (None for the operator)."""
        statement = (
            select(ConsoleSession, ApiKey)
            .outerjoin(ApiKey, ApiKey.id == ConsoleSession.key_id)
            .where(ConsoleSession.token_hash == token_hash, ConsoleSession.expires_at > now)
        )
        row = (await self.session.execute(statement)).first()
        return None if row is None else (row[0], row[1])

    async def remove(self, token_hash: bytes) -> None:
        await self.session.execute(
            delete(ConsoleSession).where(ConsoleSession.token_hash == token_hash)
        )

    async def remove_expired(self, now: datetime) -> None:
        await self.session.execute(delete(ConsoleSession).where(ConsoleSession.expires_at <= now))
