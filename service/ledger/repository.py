"""The ledger's one write: a batch of rows in one idempotent statement.

A batch travels as one JSON array, the records' own JSON lines (made once, when the
record was journaled) joined with commas, and `json_to_recordset` turns it back into
typed rows: the proxy's process spends next to nothing encoding a batch, and a batch of
any size is one round trip. Costs are JSON strings, read by `numeric`'s own input:
exact. `ON CONFLICT DO NOTHING` on the primary key (`request_id`, `occurred_at`) makes
replaying a batch, whole or in part, a no-op.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime

import asyncpg

from service.ledger.record import COLUMNS

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

_RECORD_TYPE = ", ".join(f"{c} {_SQL_TYPES[c]}" for c in COLUMNS)
INSERT_BATCH = (
    f"INSERT INTO usage_ledger ({', '.join(COLUMNS)}) "
    f"SELECT {', '.join(COLUMNS)} FROM json_to_recordset($1::json) AS r({_RECORD_TYPE}) "
    "ON CONFLICT DO NOTHING"
)


class LedgerRepository:
    def __init__(self) -> None:
        self._months: set[datetime] = set()  # partitions known to exist

    async def insert(
        self, connection: asyncpg.Connection, lines: Sequence[bytes], months: Iterable[datetime]
    ) -> int:
        """Insert the rows (JSON lines) not already present; returns how many were new.

        `months` holds at least the month start of every row's `occurred_at`; their
        partitions are created first if this process has not seen them yet.
        """
        missing = set(months) - self._months
        for month in sorted(missing):
            await connection.execute("SELECT meterline_ensure_usage_partition($1)", month)
        self._months |= missing
        payload = (b"[" + b",".join(lines) + b"]").decode()
        status: str = await connection.execute(INSERT_BATCH, payload)
        return int(status.rsplit(" ", 1)[-1])
