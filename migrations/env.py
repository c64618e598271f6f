"""Alembic environment: async (asyncpg), URL from Meterline's settings or `-x url=…`."""

from __future__ import annotations

import asyncio
import re
from typing import Any

from alembic import context
from sqlalchemy import pool
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import async_engine_from_config

from service.db import models  # noqa: F401  (registers every table on the metadata)
from service.db.base import Base
from service.db.engine import sqlalchemy_url
from service.settings import get_settings

config = context.config
target_metadata = Base.metadata

# Monthly ledger partitions are made at run time, not by migrations: autogenerate ignores them.
_PARTITION = re.compile(r"^usage_ledger_(p\d{6}|default)$")


def _include_name(name: str | None, type_: str, parent_names: Any) -> bool:
    return not (type_ == "table" and name is not None and _PARTITION.match(name))


def _url() -> str:
    url = config.attributes.get("url") or context.get_x_argument(as_dictionary=True).get("url")
    if not url:
        url = get_settings().database_url
    if not url:
        raise SystemExit("no database URL: set METERLINE_DATABASE_URL or pass -x url=…")
    return sqlalchemy_url(url)


def _configure(connection: Connection | None = None, **kw: Any) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        include_name=_include_name,
        compare_type=True,
        compare_server_default=False,
        **kw,
    )


def run_migrations_offline() -> None:
    _configure(url=_url(), literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def _run_sync(connection: Connection) -> None:
    _configure(connection)
    with context.begin_transaction():
        context.run_migrations()


async def run_migrations_online() -> None:
    engine = async_engine_from_config(
        {"sqlalchemy.url": _url()}, prefix="sqlalchemy.", poolclass=pool.NullPool
    )
    async with engine.connect() as connection:
        await connection.run_sync(_run_sync)
    await engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    asyncio.run(run_migrations_online())
