"""Ledger rows written straight into Postgres, for tests that need controlled usage data."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import asyncpg

from tests.support import Database

COLUMNS = (
    "request_id",
    "occurred_at",
    "kind",
    "account_id",
    "key_id",
    "task_id",
    "task_type",
    "endpoint",
    "requested_model",
    "upstream_model",
    "provider",
    "stream",
    "status_code",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "usage_source",
    "cost_usd",
    "price_version_id",
    "usage_flag",
)


def usage_row(
    account_id: uuid.UUID | str,
    occurred_at: datetime,
    *,
    prompt: int = 10,
    completion: int = 5,
    cost: Decimal | str | None = "0.000015",
    model: str = "mock-chat",
    key_id: uuid.UUID | str | None = None,
    task_id: str | None = None,
    task_type: str | None = None,
    provider: str | None = "mock",
    status: int = 200,
    kind: str = "usage",
    cached: int = 0,
    reasoning: int = 0,
    request_id: str | None = None,
    price_version_id: int | None = None,
    flag: str | None = None,
) -> dict[str, Any]:
    return {
        "request_id": request_id or "req_" + secrets.token_hex(12),
        "occurred_at": occurred_at,
        "kind": kind,
        "account_id": uuid.UUID(str(account_id)),
        "key_id": uuid.UUID(str(key_id)) if key_id else None,
        "task_id": task_id,
        "task_type": task_type,
        "endpoint": "chat",
        "requested_model": model,
        "upstream_model": model,
        "provider": provider,
        "stream": False,
        "status_code": status,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "cached_tokens": cached,
        "reasoning_tokens": reasoning,
        "usage_source": "upstream",
        "cost_usd": None if cost is None else Decimal(cost),
        "price_version_id": price_version_id,
        "usage_flag": flag,
    }


async def _insert(dsn: str, rows: list[dict[str, Any]]) -> None:
    connection = await asyncpg.connect(dsn)
    try:
        months = {r["occurred_at"].astimezone(UTC).strftime("%Y%m"): r["occurred_at"] for r in rows}
        for at in months.values():
            await connection.execute("SELECT meterline_ensure_usage_partition($1)", at)
        placeholders = ", ".join(f"${i}" for i in range(1, len(COLUMNS) + 1))
        await connection.executemany(
            f"INSERT INTO usage_ledger ({', '.join(COLUMNS)}) VALUES ({placeholders})",
            [tuple(r[c] for c in COLUMNS) for r in rows],
        )
    finally:
        await connection.close()


def insert_usage(db: Database, *rows: dict[str, Any]) -> None:
    asyncio.run(_insert(db.dsn, list(rows)))
