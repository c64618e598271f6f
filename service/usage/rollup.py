"""The daily usage rollup's fold, run by the rollup job beside the invoices' one."""

from __future__ import annotations

import logging
import time

from sqlalchemy.ext.asyncio import AsyncSession

from service.usage.repository import UsageRepository

log = logging.getLogger("meterline.usage")


async def roll_up_daily(session: AsyncSession, wait: bool = False) -> int | None:
    """Fold the ledger rows recorded since the last round into `usage_daily`; the rows
    added, or None when another process is at it (with `wait=False`)."""
    started = time.perf_counter()
    done = await UsageRepository(session).roll_up_daily(wait=wait)
    if done is None:
        return None
    _, until, rows = done
    if rows:
        log.info(
            "event=usage_daily_rolled_up rows=%d until=%s seconds=%.3f",
            rows,
            until.isoformat(),
            time.perf_counter() - started,
        )
    return rows
