"""Monthly partitions of the usage ledger, created ahead of the rows that need them."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncConnection

from pricing.invoice import BillingPeriod
from service.db.repository import ensure_usage_partition


async def ensure_partitions(connection: AsyncConnection, months: Iterable[BillingPeriod]) -> None:
    for month in sorted(set(months)):
        await ensure_usage_partition(connection, month.start)


def around(now: datetime, before: int = 1, after: int = 2) -> list[BillingPeriod]:
    """The months a running server will write to soon: last month (late rows) to next."""
    current = BillingPeriod.of(now)
    return [current.shifted(k) for k in range(-before, after + 1)]
