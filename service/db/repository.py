"""The repository idiom: every query of a domain lives in its `repository` module.

A repository holds the session of the request (or job) and never commits: the boundary
does. Statements are SQLAlchemy Core or ORM, composed where filters vary; `text()` is for
large static SQL only; raw asyncpg only where a pooled connection of its own is the point
(the ledger writer, the task guard). `tests/test_architecture.py` fails on a query written
anywhere else.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import Select, func, literal, select, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

# Any select, of any number of columns.
S = TypeVar("S", bound=Select[*tuple[Any, ...]])


class Repository:
    """A domain's queries, run in the caller's session (and its transaction)."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def now(self) -> datetime:
        """The database's clock: the start of this transaction, as every row it writes has."""
        at: datetime = (await self.session.execute(select(func.now()))).scalar_one()
        return at


def readable(statement: S, account_column: Any, account_id: uuid.UUID | None) -> S:
    """`statement` limited to what the caller may read: the rows of `account_id`, the
    account `Principal.scope` gave (the customer's own, or the admin's choice); every
    account's when None (the admin, unfiltered). The one place tenant scoping is SQL."""
    if account_id is None:
        return statement
    return statement.where(account_column == account_id)


def constant(value: Any) -> Any:
    """`value` written into the statement's text rather than bound: for the constants of a
    statement sent as text (COPY takes no parameters), which would otherwise be as many
    parameters to inline."""
    return literal(value, literal_execute=True)


async def ping(connection: AsyncConnection) -> None:
    """A round trip to the database (raises when it cannot be reached)."""
    await connection.execute(text("SELECT 1"))


async def migrated(connection: AsyncConnection) -> bool:
    """Whether `meterline db upgrade` ever ran on the database."""
    return await connection.scalar(text("SELECT to_regclass('alembic_version')")) is not None


async def ensure_usage_partition(connection: AsyncConnection, month: Any) -> None:
    """Create the ledger's partition of `month` unless it exists (migration 0001's function)."""
    await connection.execute(text("SELECT meterline_ensure_usage_partition(:at)"), {"at": month})
