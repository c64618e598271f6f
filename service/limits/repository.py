"""Every query of the limits: the limits of keys and their accounts, and a month's spend."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from service.limits.policy import KeyLimits

_COLUMNS = (
    "SELECT k.id AS key_id, k.account_id, a.tier, a.rate_limit_rpm AS account_rpm, "
    "a.rate_limit_tpm AS account_tpm, a.monthly_budget_usd AS account_budget_usd, "
    "k.rate_limit_rpm AS key_rpm, k.rate_limit_tpm AS key_tpm, "
    "k.monthly_budget_usd AS key_budget_usd "
    "FROM api_keys k JOIN accounts a ON a.id = k.account_id "
)
_ACTIVE = text(
    _COLUMNS + "WHERE k.revoked_at IS NULL AND (k.expires_at IS NULL OR k.expires_at > now())"
)
_ONE = text(_COLUMNS + "WHERE k.id = :key_id")

_ACCOUNT_SPEND = text(
    "SELECT account_id, COALESCE(SUM(cost_usd), 0) AS spent FROM usage_ledger "
    "WHERE account_id = ANY(:ids) AND occurred_at >= :start AND occurred_at < :end "
    "GROUP BY account_id"
)
# The account's index narrows the scan to its month; the key is a filter within it.
_KEY_SPEND = text(
    "SELECT key_id, COALESCE(SUM(cost_usd), 0) AS spent FROM usage_ledger "
    "WHERE account_id = ANY(:accounts) AND key_id = ANY(:ids) "
    "AND occurred_at >= :start AND occurred_at < :end GROUP BY key_id"
)


def _limits(row: Any) -> KeyLimits:
    return KeyLimits(
        key_id=row.key_id,
        account_id=row.account_id,
        tier=row.tier,
        account_rpm=row.account_rpm,
        account_tpm=row.account_tpm,
        account_budget_usd=row.account_budget_usd,
        key_rpm=row.key_rpm,
        key_tpm=row.key_tpm,
        key_budget_usd=row.key_budget_usd,
    )


async def active_key_limits(connection: AsyncConnection) -> list[KeyLimits]:
    return [_limits(row) for row in await connection.execute(_ACTIVE)]


async def key_limits(connection: AsyncConnection, key_id: uuid.UUID) -> KeyLimits | None:
    row = (await connection.execute(_ONE, {"key_id": key_id})).first()
    return None if row is None else _limits(row)


async def account_spend(
    connection: AsyncConnection, accounts: Sequence[uuid.UUID], start: datetime, end: datetime
) -> dict[uuid.UUID, Decimal]:
    """Ledger cost of each account between `start` and `end` (absent: nothing spent)."""
    rows = await connection.execute(
        _ACCOUNT_SPEND, {"ids": list(accounts), "start": start, "end": end}
    )
    return {row.account_id: row.spent for row in rows}


async def key_spend(
    connection: AsyncConnection,
    keys: Sequence[tuple[uuid.UUID, uuid.UUID]],
    start: datetime,
    end: datetime,
) -> dict[uuid.UUID, Decimal]:
    """Ledger cost of each (account, key) pair's key between `start` and `end`."""
    rows = await connection.execute(
        _KEY_SPEND,
        {
            "accounts": list({account for account, _ in keys}),
            "ids": [key for _, key in keys],
            "start": start,
            "end": end,
        },
    )
    return {row.key_id: row.spent for row in rows}
