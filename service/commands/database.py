"""The direct-database commands: `db`, `prices import`, `invoices generate|rollup` open
Postgres themselves, for what the billing API has no endpoint for.

They run where the server runs, against `METERLINE_DATABASE_URL` or the embedded Postgres of
the data directory, and never create a database: finding none, or one without Meterline's
schema, they say in one line what to do instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from pricing.price_table import PriceTableError
from service.commands.output import fail
from service.db.embedded import NoEmbeddedDatabase, database_url
from service.db.engine import create_engine, session_factory, transaction
from service.db.repository import migrated
from service.errors import MeterlineError
from service.settings import get_settings
from service.startup import without_password

T = TypeVar("T")

# The heading of these commands in `meterline --help` (and in a group mixing both families).
DIRECT = "Straight to the database (METERLINE_DATABASE_URL or the embedded Postgres)"


class NoSchema(Exception):
    """The database is there, but `meterline db upgrade` never ran on it."""


async def _check_schema(engine: AsyncEngine, url: str) -> None:
    async with engine.connect() as connection:
        has_schema = await migrated(connection)
    if not has_schema:
        raise NoSchema(
            f"the database {without_password(url)} has no Meterline schema:"
            " run `meterline db upgrade` first"
        )


def run_with_database(work: Callable[[async_sessionmaker[AsyncSession]], Awaitable[T]]) -> T:
    """Run `work` against the configured (or embedded) database; it opens its own
    transactions. An expected error is printed in one line and exits 1."""

    async def _run(url: str) -> T:
        engine = create_engine(url, pool_size=1)
        try:
            await _check_schema(engine, url)
            return await work(session_factory(engine))
        finally:
            await engine.dispose()

    try:
        with database_url(get_settings()) as url:
            try:
                return asyncio.run(_run(url))
            except OSError as exc:  # refused, unreachable, no such socket
                fail(f"cannot reach the database {without_password(url)}: {exc}", 2)
    except (NoEmbeddedDatabase, NoSchema) as exc:
        fail(str(exc))
    except MeterlineError as exc:
        fail(exc.message)
    except PriceTableError as exc:
        fail(str(exc))


def run_in_transaction(work: Callable[[AsyncSession], Awaitable[T]]) -> T:
    """Run `work` in one transaction: committed on success, nothing on error."""

    async def _one(sessions: async_sessionmaker[AsyncSession]) -> T:
        async with transaction(sessions) as session:
            return await work(session)

    return run_with_database(_one)
