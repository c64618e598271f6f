"""The usage rollup's background job: folds newly recorded ledger rows into `usage_rollup`.

Every `interval` seconds one process (the one that gets the state row's lock; the others
skip that round) adds the priced rows recorded since the watermark, up to a new watermark
below which no row can still be uncommitted. It only reads the ledger, so ingest is not
slowed; an invoice then sums the rollup plus the ledger rows recorded since, instead of a
month of ledger rows.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.db.engine import transaction
from service.invoices.repository.rollup import RollupRepository
from service.lifecycle import Periodic

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


def rollup_job(
    name: str, sessions: async_sessionmaker[AsyncSession], interval: float, fold: Fold
) -> Periodic:
    """Run `fold` every `interval` seconds, each round in its own transaction (a round that
    fails, the database down, is caught up by the next)."""

    async def one_round() -> None:
        async with transaction(sessions) as session:
            await fold(session)

    return Periodic(name, interval, one_round, log)
