"""Ingested events' identities, and their rows through the ledger's own batch insert."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from service.db.models import Account, ApiKey, IngestedEvent
from service.ledger.record import LedgerRecord, months_of
from service.ledger.repository import LedgerRepository


class EventRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def existing_accounts(self, ids: Iterable[uuid.UUID]) -> set[uuid.UUID]:
        rows = await self.session.scalars(select(Account.id).where(Account.id.in_(set(ids))))
        return set(rows)

    async def key_accounts(self, ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, uuid.UUID]:
        rows = await self.session.execute(
            select(ApiKey.id, ApiKey.account_id).where(ApiKey.id.in_(set(ids)))
        )
        return {key_id: account_id for key_id, account_id in rows}

    async def claim(
        self, identities: Sequence[tuple[str, str, str, datetime]]
    ) -> set[tuple[str, str]]:
        """Record (source, id, request id, time) of each event; returns those not seen before."""
        if not identities:
            return set()
        statement = (
            insert(IngestedEvent)
            .values(
                [
                    {"source": s, "event_id": e, "request_id": r, "occurred_at": t}
                    for s, e, r, t in identities
                ]
            )
            .on_conflict_do_nothing()
            .returning(IngestedEvent.source, IngestedEvent.event_id)
        )
        return {(source, event_id) for source, event_id in await self.session.execute(statement)}

    async def store(self, records: Sequence[LedgerRecord]) -> int:
        """The rows, by the insert the ledger writer uses, in this session's transaction."""
        if not records:
            return 0
        connection = await (await self.session.connection()).get_raw_connection()
        lines = [record.to_json() for record in records]
        return await LedgerRepository().insert(
            connection.driver_connection, lines, months_of(lines)
        )
