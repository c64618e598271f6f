"""Every query of the keys' readers: the key directory's loads and the billing API's lookup.

The directory's rows carry what authenticating a proxied request needs (the key's
account, prefix and expiry) and what admitting it needs (the limits of the key and of its
account), so one load serves both.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any, TypeAlias

from sqlalchemy import Row, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from service.auth.usability import usable_key
from service.db.models import Account, ApiKey, BillingMode

_DIRECTORY_ROWS = select(
    ApiKey.id.label("key_id"),
    ApiKey.account_id,
    ApiKey.prefix,
    ApiKey.key_hash,
    ApiKey.expires_at,
    ApiKey.revoked_at,
    Account.tier,
    Account.rate_limit_rpm.label("account_rpm"),
    Account.rate_limit_tpm.label("account_tpm"),
    Account.monthly_budget_usd.label("account_budget_usd"),
    ApiKey.rate_limit_rpm.label("key_rpm"),
    ApiKey.rate_limit_tpm.label("key_tpm"),
    ApiKey.monthly_budget_usd.label("key_budget_usd"),
    (Account.billing_mode == BillingMode.PREPAID).label("prepaid"),
).join(Account, Account.id == ApiKey.account_id)


# A key with its limits: the columns above, by their labels.
DirectoryRow: TypeAlias = Row[*tuple[Any, ...]]

_USABLE = _DIRECTORY_ROWS.where(usable_key())


async def usable_keys(connection: AsyncConnection) -> Sequence[DirectoryRow]:
    """Every usable key, with its limits."""
    rows: Sequence[DirectoryRow] = (await connection.execute(_USABLE)).all()
    return rows


async def key_by_hash(connection: AsyncConnection, key_hash: bytes) -> DirectoryRow | None:
    """The key with this hash, usable or not, with its limits."""
    statement = _DIRECTORY_ROWS.where(ApiKey.key_hash == key_hash)
    row: DirectoryRow | None = (await connection.execute(statement)).first()
    return row


async def key_by_id(connection: AsyncConnection, key_id: uuid.UUID) -> DirectoryRow | None:
    """The key with this id, usable or not, with its limits."""
    statement = _DIRECTORY_ROWS.where(ApiKey.id == key_id)
    row: DirectoryRow | None = (await connection.execute(statement)).first()
    return row


async def key_with_hash(session: AsyncSession, key_hash: bytes) -> ApiKey | None:
    """The stored key with this hash (the billing API's and the console's sign-in)."""
    key: ApiKey | None = await session.scalar(select(ApiKey).where(ApiKey.key_hash == key_hash))
    return key
