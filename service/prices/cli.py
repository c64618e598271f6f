"""`meterline prices import|export`: price tables as CSV or YAML. `export` is a client of
`GET /billing/prices` (`service/commands/api.py`); `import` adds a whole table all or nothing,
which the API (one version per request) cannot, so it goes straight to the database
(`service/commands/database.py`)."""

from __future__ import annotations

import sys
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any

import typer

from pricing.price_table import TableFormat, format_price_table
from pricing.prices import Price
from service.commands.api import API_CLIENTS, BillingClient, TokenOption, UrlOption
from service.commands.database import DIRECT, run_in_transaction
from service.commands.output import err, fail
from service.prices import service

prices_app = typer.Typer(
    help="Price tables (USD per 1M tokens; import straight to the database).",
    no_args_is_help=True,
)


def table_format_of(path: Path | None, given: str | None) -> TableFormat:
    name = (given or (path.suffix.lstrip(".") if path else "") or "csv").lower()
    if name in ("yaml", "yml"):
        return "yaml"
    if name == "csv":
        return "csv"
    fail(f"unknown format {name!r}: csv or yaml")


@prices_app.command("import", rich_help_panel=DIRECT)
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
    text, table_format = read_table(file, fmt)
    result = run_in_transaction(lambda s: service.import_table(s, text, table_format))
    err.print(f"imported {len(result.added)} new versions, {result.unchanged} already present")


def read_table(file: Path, fmt: str | None) -> tuple[str, TableFormat]:
    """A table's text ('-': stdin) and its format (given, else by extension, else CSV)."""
    stdin = str(file) == "-"
    try:
        text = sys.stdin.read() if stdin else file.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"cannot read {file}: {getattr(exc, 'strerror', None) or exc}")
    return text, table_format_of(None if stdin else file, fmt)


def write_table(text: str, output: Path | None) -> None:
    """A table to `output`, or to stdout."""
    if output is None:
        sys.stdout.write(text)
        return
    try:
        output.write_text(text)
    except OSError as exc:
        fail(f"cannot write {output}: {exc.strerror or exc}")
    err.print(f"wrote {output}")


def price_of_version(version: dict[str, Any]) -> Price:
    """A version as `GET /billing/prices` answers it (rates as decimal strings)."""
    cached = version["cached_input_usd_per_mtok"]
    return Price(
        model=version["model"],
        input_usd_per_mtok=Decimal(version["input_usd_per_mtok"]),
        output_usd_per_mtok=Decimal(version["output_usd_per_mtok"]),
        cached_input_usd_per_mtok=None if cached is None else Decimal(cached),
        effective_from=datetime.fromisoformat(version["effective_from"]),
    )


@prices_app.command("export", rich_help_panel=API_CLIENTS)
def export_prices(
    fmt: Annotated[str | None, typer.Option("--format", "-f", help="csv | yaml.")] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="File to write.", show_default="stdout")
    ] = None,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Every price version, readable back by `meterline prices import` (any caller)."""
    table_format = table_format_of(output, fmt)
    with BillingClient(url, token) as client:
        versions = client.request("GET", "/billing/prices")["data"]
    write_table(format_price_table([price_of_version(v) for v in versions], table_format), output)
