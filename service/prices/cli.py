"""`meterline prices import|export`: price tables as CSV or YAML, straight to the database."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from pricing.price_table import PriceTableError, TableFormat
from service.api_client import err, fail
from service.db.embedded import database_url
from service.db.engine import create_engine, session_factory, transaction
from service.errors import MeterlineError
from service.prices import service
from service.settings import get_settings

T = TypeVar("T")

prices_app = typer.Typer(help="Price tables (USD per 1M tokens).", no_args_is_help=True)


def run_with_database(work: Callable[[async_sessionmaker[AsyncSession]], Awaitable[T]]) -> T:
    """Run `work` against the configured (or embedded) database; it opens its own
    transactions. An expected error is printed and exits 1."""

    async def _run(url: str) -> T:
        engine = create_engine(url, pool_size=1)
        try:
            return await work(session_factory(engine))
        finally:
            await engine.dispose()

    with database_url(get_settings()) as url:
        try:
            return asyncio.run(_run(url))
        except (MeterlineError, PriceTableError) as exc:
            fail(str(exc.message if isinstance(exc, MeterlineError) else exc))


def run_in_transaction(work: Callable[[AsyncSession], Awaitable[T]]) -> T:
    """Run `work` in one transaction: committed on success, nothing on error."""

    async def _one(sessions: async_sessionmaker[AsyncSession]) -> T:
        async with transaction(sessions) as session:
            return await work(session)

    return run_with_database(_one)


def _format_of(path: Path | None, given: str | None) -> TableFormat:
    name = (given or (path.suffix.lstrip(".") if path else "") or "csv").lower()
    if name in ("yaml", "yml"):
        return "yaml"
    if name == "csv":
        return "csv"
    fail(f"unknown format {name!r}: csv or yaml")


@prices_app.command("import")
def import_prices(
    file: Annotated[Path, typer.Argument(help="CSV or YAML price table ('-' for stdin).")],
    fmt: Annotated[
        str | None, typer.Option("--format", "-f", help="csv | yaml [default: by extension].")
    ] = None,
) -> None:
    """Add the table's versions (rows without effective_from take effect now).

    Versions already present are skipped; one present with other rates refuses the whole
    import. Past ledger rows and finalized invoices never change.
    """
    stdin = str(file) == "-"
    text = sys.stdin.read() if stdin else file.read_text()
    table_format = _format_of(None if stdin else file, fmt)
    result = run_in_transaction(lambda s: service.import_table(s, text, table_format))
    err.print(f"imported {len(result.added)} new versions, {result.unchanged} already present")


@prices_app.command("export")
def export_prices(
    fmt: Annotated[str | None, typer.Option("--format", "-f", help="csv | yaml.")] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="File to write [default: stdout].")
    ] = None,
) -> None:
    """Every price version, readable back by `meterline prices import`."""
    table_format = _format_of(output, fmt)
    text = run_in_transaction(lambda s: service.export_table(s, table_format))
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text)
        err.print(f"wrote {output}")
