"""The ledger's one write: a batch of rows in one idempotent statement.

Each column travels as one array and `unnest` turns the arrays back into rows, so a batch
of any size is one round trip and one statement; `ON CONFLICT DO NOTHING` on the primary
key (`request_id`, `occurred_at`) makes replaying a batch, whole or in part, a no-op.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import asyncpg

from service.db.partitions import month_start
from service.ledger.record import COLUMNS, LedgerRecord

_SQL_TYPES = {
    "request_id": "text",
    "occurred_at": "timestamptz",
    "account_id": "uuid",
    "key_id": "uuid",
    "task_id": "text",
    "task_type": "text",
    "endpoint": "text",
    "requested_model": "text",
    "upstream_model": "text",
    "provider": "text",
    "stream": "bool",
    "status_code": "int2",
    "error_code": "text",
    "prompt_tokens": "int4",
    "completion_tokens": "int4",
    "total_tokens": "int4",
    "cached_tokens": "int4",
    "reasoning_tokens": "int4",
    "usage_source": "text",
    "latency_ms": "int4",
    "ttft_ms": "int4",
    "cost_usd": "numeric",
    "price_version_id": "int8",
    "kind": "text",
}

_ARRAYS = ", ".join(f"${i}::{_SQL_TYPES[c]}[]" for i, c in enumerate(COLUMNS, 1))
INSERT_BATCH = (
    f"INSERT INTO usage_ledger ({', '.join(COLUMNS)}) "
    f"SELECT * FROM unnest({_ARRAYS}) ON CONFLICT DO NOTHING"
)


class LedgerRepository:
    def __init__(self) -> None:
        self._months: set[datetime] = set()  # partitions known to exist

    async def insert(self, connection: asyncpg.Connection, records: Sequence[LedgerRecord]) -> int:
        """Insert the rows not already present; returns how many were new."""
        months = {month_start(r.occurred_at) for r in records} - self._months
        for month in sorted(months):
            await connection.execute("SELECT meterline_ensure_usage_partition($1)", month)
        columns = [list(c) for c in zip(*(r.as_row() for r in records), strict=True)]
        status: str = await connection.execute(INSERT_BATCH, *columns)
        self._months |= months
        return int(status.rsplit(" ", 1)[-1])
