"""The ledger's recent attempts per (provider, model): what routing statistics start from."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Float, case, cast, func, select

from service.db.models import UsageRecord
from service.db.repository import Repository


@dataclass(frozen=True, slots=True)
class RecentRoute:
    provider: str
    model: str
    attempts: int
    error_rate: float
    ttft_ms: float | None
    latency_ms: float | None
    last: datetime


class RoutingRepository(Repository):
    async def recent_routes(self, since: datetime) -> list[RecentRoute]:
        """Every (provider, model) attempted since `since`: its attempts, the share that
        failed (429 or 5xx), and the mean first-byte and total time of the others."""
        row = UsageRecord
        failed = (row.status_code == 429) | (row.status_code >= 500)
        ok = ~failed
        statement = (
            select(
                row.provider,
                row.requested_model,
                func.count(),
                func.avg(cast(case((failed, 1), else_=0), Float)),
                func.avg(case((ok, row.ttft_ms))),
                func.avg(case((ok, row.latency_ms))),
                func.max(row.occurred_at),
            )
            # `recorded_at` too: its BRIN index keeps this a read of the ledger's last
            # minutes, not of the month's partition.
            .where(row.occurred_at >= since, row.recorded_at >= since, row.provider.is_not(None))
            .group_by(row.provider, row.requested_model)
        )
        result = await self.session.execute(statement)
        return [
            RecentRoute(
                provider,
                model,
                int(count),
                float(errors),
                None if ttft is None else float(ttft),
                None if latency is None else float(latency),
                last,
            )
            for provider, model, count, errors, ttft, latency, last in result.all()
        ]
