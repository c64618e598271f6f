"""`meterline prices import|export`: price tables as CSV or YAML, straight to the database
(a direct-database command: `service/commands/database.py`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from pricing.price_table import TableFormat
from service.commands.database import run_in_transaction
from service.commands.output import err, fail
from service.prices import service

prices_app = typer.Typer(help="Price tables (USD per 1M tokens).", no_args_is_help=True)


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
        str | None,
        typer.Option("--format", "-f", help="csv | yaml.", show_default="by extension"),
    ] = None,
) -> None:
    """Add the table's versions (rows without effective_from take effect now).

    Versions already present are skipped; one present with other rates refuses the whole
    import. Past ledger rows and finalized invoices never change.
    """
    stdin = str(file) == "-"
    try:
        text = sys.stdin.read() if stdin else file.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"cannot read {file}: {getattr(exc, 'strerror', None) or exc}")
    table_format = _format_of(None if stdin else file, fmt)
    result = run_in_transaction(lambda s: service.import_table(s, text, table_format))
    err.print(f"imported {len(result.added)} new versions, {result.unchanged} already present")


@prices_app.command("export")
def export_prices(
    fmt: Annotated[str | None, typer.Option("--format", "-f", help="csv | yaml.")] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="File to write.", show_default="stdout")
    ] = None,
) -> None:
    """Every price version, readable back by `meterline prices import`."""
    table_format = _format_of(output, fmt)
    text = run_in_transaction(lambda s: service.export_table(s, table_format))
    if output is None:
        sys.stdout.write(text)
    else:
        try:
            output.write_text(text)
        except OSError as exc:
            fail(f"cannot write {output}: {exc.strerror or exc}")
        err.print(f"wrote {output}")
