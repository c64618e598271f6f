"""Events noticed on the proxy's hot path, written to the outbox off it.

A request's settlement may notice that a budget passed 80 % or a quoted task its cap; it
must not wait on Postgres (let alone a receiver) for that. It `offer`s the event here:
an append to a bounded in-memory queue, never blocking, never awaiting. A background job
drains the queue into the outbox (`raise_event`) in one transaction a round, at once when
woken, and once more as the process stops.

Every such event carries a `dedup_key`, so several processes noticing the same threshold,
or a drain retried after a failed commit, store it once. The queue lives in memory: a
process killed outright loses the events it had not drained yet (a fraction of a second's
worth); the next settlement of the same budget or task (by any process), and for budgets
the periodic resync against the ledger, notices the crossing again and raises it then.
"""

from __future__ import annotations

import logging
import uuid
from collections import deque
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.db.session import commit
from service.lifecycle import Periodic
from service.webhooks.events import EventType
from service.webhooks.outbox import raise_event

log = logging.getLogger("meterline.webhooks")

_MAX_PENDING = 10_000
_DRAIN_INTERVAL_S = 1.0
_BATCH = 500


@dataclass(frozen=True, slots=True)
class PendingEvent:
    type: EventType
    data: dict[str, Any]
    account_id: uuid.UUID | None
    dedup_key: str
    at: datetime


class PendingEvents:
    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions
        self._queue: deque[PendingEvent] = deque()
        self._drainer = Periodic("webhook_pending_drain", _DRAIN_INTERVAL_S, self.drain, log)
        self.dropped = 0

    def offer(self, event: PendingEvent) -> None:
        """Queue `event` for the outbox; never blocks (full: dropped, and logged)."""
        if len(self._queue) >= _MAX_PENDING:
            self.dropped += 1
            log.warning("event=webhook_event_dropped type=%s", event.type.value)
            return
        self._queue.append(event)
        self._drainer.wake()

    async def drain(self) -> None:
        while self._queue:
            batch = [self._queue.popleft() for _ in range(min(len(self._queue), _BATCH))]
            try:
                async with self._sessions() as session:
                    for event in batch:
                        await raise_event(
                            session,
                            event.type,
                            event.data,
                            event.account_id,
                            dedup_key=event.dedup_key,
                            at=event.at,
                        )
                    await commit(session)
            except BaseException:
                self._queue.extendleft(reversed(batch))  # the next round tries them again
                raise

    def start(self) -> None:
        self._drainer.start()

    async def stop(self) -> None:
        await self._drainer.stop()
        try:
            await self.drain()
        except Exception as exc:
            log.warning(
                "event=webhook_pending_lost count=%d error=%s", len(self._queue), type(exc).__name__
            )
