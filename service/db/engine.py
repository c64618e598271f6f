"""Engine and session factory; URLs of any Postgres normalised to the asyncpg driver."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from service.db.session import commit


def sqlalchemy_url(url: str) -> str:
    """`postgresql://…` (libpq style) → `postgresql+asyncpg://…` for SQLAlchemy."""
    parsed = make_url(url)
    return parsed.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)


def asyncpg_dsn(url: str) -> str:
    """Any accepted URL → a plain `postgresql://…` DSN for direct asyncpg connections."""
    parsed = make_url(url)
    return parsed.set(drivername="postgresql").render_as_string(hide_password=False)


# A Postgres that does not answer a connection attempt within this is down for a caller.
CONNECT_TIMEOUT_S = 5.0


def create_engine(url: str, pool_size: int = 10) -> AsyncEngine:
    return create_async_engine(
        sqlalchemy_url(url),
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        # A failed statement's error would otherwise carry its parameters into every log
        # line and traceback that shows it: a new key's hash, a customer's text.
        hide_parameters=True,
        connect_args={"timeout": CONNECT_TIMEOUT_S},
    )


# Postgres refusing or dropping connections (down, starting, shutting down, full), and a
# pool with no connection to give within its timeout; anything else is about a statement.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    sa_exc.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.TooManyConnectionsError,
)


def database_unavailable(error: BaseException) -> bool:
    """Whether `error` means Postgres cannot be reached now, rather than refusing a statement.

    The one place that knows how the drivers say so: a connection attempt fails with an
    OSError (refused, no socket file, timeout) that SQLAlchemy passes through unwrapped; a
    connection lost mid-use is a DBAPIError whose connection SQLAlchemy invalidated; a full
    pool times out; asyncpg's own connection and shutdown errors arrive wrapped.
    """
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, _UNAVAILABLE):
            return True
        if isinstance(seen, sa_exc.DBAPIError) and seen.connection_invalidated:
            return True
        seen = seen.__cause__
    return False


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


@asynccontextmanager
async def transaction(sessions: async_sessionmaker[AsyncSession]) -> AsyncIterator[AsyncSession]:
    """A unit of work for jobs and the CLI: commits on success (then runs its after-commit
    effects), rolls back on error."""
    async with sessions() as session:
        yield session
        await commit(session)


async def tune_for_aggregation(executor: AsyncSession | AsyncConnection) -> None:
    """Settings for this transaction only, for a query summing a month of the ledger.

    Postgres estimates the groups of a month (account x model x version) as their product,
    often a million where there are tens of thousands, and would then sort millions of rows
    instead of hashing them: enough hash memory keeps it on a hash aggregate (it uses what
    it needs, ~50 MB for 5M rows and 1,000 accounts). No JIT: its compile time (seconds for
    the export's expressions) exceeds its gain here."""
    await executor.execute(text("SET LOCAL work_mem = '64MB'"))
    await executor.execute(text("SET LOCAL hash_mem_multiplier = 16"))
    await executor.execute(text("SET LOCAL jit = off"))
