"""Monthly partitions of the usage ledger, created ahead of the rows that need them."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncConnection

from service.db.repository import ensure_usage_partition


def month_start(at: datetime) -> datetime:
    """The UTC month of an instant; a naive datetime is refused (whose zone would it be?)."""
    if at.tzinfo is None:
        raise ValueError(f"a partition month needs an instant; {at.isoformat()} has no zone")
    at = at.astimezone(UTC)
    return datetime(at.year, at.month, 1, tzinfo=UTC)


def add_months(start: datetime, months: int) -> datetime:
    index = start.year * 12 + start.month - 1 + months
    return datetime(index // 12, index % 12 + 1, 1, tzinfo=UTC)


async def ensure_partitions(connection: AsyncConnection, months: list[datetime]) -> None:
    for month in sorted({month_start(m) for m in months}):
        await ensure_usage_partition(connection, month)


def around(now: datetime, before: int = 1, after: int = 2) -> list[datetime]:
    """The months a running server will write to soon: last month (late rows) to next."""
    start = month_start(now)
    return [add_months(start, k) for k in range(-before, after + 1)]
