"""The usage rollup's background job: folds newly recorded ledger rows into `usage_rollup`.

Every `interval` seconds one process (the one that gets the state row's lock; the others
skip that round) adds the priced rows recorded since the watermark, up to a new watermark
below which no row can still be uncommitted. It only reads the ledger, so ingest is not
slowed; an invoice then sums the rollup plus the ledger rows recorded since, instead of a
month of ledger rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.db.engine import transaction
from service.invoices.repository.rollup import RollupRepository

log = logging.getLogger("meterline.invoices")


@dataclass(frozen=True, slots=True)
class RollUp:
    since: datetime
    until: datetime
    rows: int
    seconds: float


async def roll_up(session: AsyncSession, wait: bool = True) -> RollUp | None:
    """Add the ledger rows recorded since the last roll-up; None if another one is running
    (with `wait=False`)."""
    started = time.perf_counter()
    done = await RollupRepository(session).roll_up(wait=wait)
    if done is None:
        return None
    since, until, rows = done
    result = RollUp(since, until, rows, time.perf_counter() - started)
    if rows:
        log.info(
            "event=usage_rolled_up rows=%d until=%s seconds=%.3f",
            rows,
            until.isoformat(),
            result.seconds,
        )
    return result


# One fold of newly recorded ledger rows into a rollup, in the session's transaction.
Fold = Callable[[AsyncSession], Awaitable[object]]


async def roll_up_if_free(session: AsyncSession) -> RollUp | None:
    return await roll_up(session, wait=False)


class RollupJob:
    """Runs each fold every `interval` seconds, each in its own transaction."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        interval: float,
        folds: Sequence[Fold] = (roll_up_if_free,),
    ) -> None:
        self._sessions = sessions
        self._interval = interval
        self._folds = folds
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._interval > 0:
            self._task = asyncio.create_task(self._run_forever(), name="usage-rollup")

    async def _run_forever(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            for fold in self._folds:
                try:
                    async with transaction(self._sessions) as session:
                        await fold(session)
                except Exception as exc:  # the database may be down; the next round catches up
                    log.warning(
                        "event=usage_rollup_failed fold=%s error=%s",
                        getattr(fold, "__name__", "fold"),
                        type(exc).__name__,
                    )

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
