"""`meterline provider-costs import|export`: one provider's cost table as CSV or YAML, in
the format of `meterline prices` (the same reader and writer). `export` is a client of
`GET /billing/provider-costs`; `import` adds a whole table all or nothing, straight to the
database, as `meterline prices import` does."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pricing.price_table import format_price_table
from service.commands.api import API_CLIENTS, BillingClient, TokenOption, UrlOption
from service.commands.database import DIRECT, run_in_transaction
from service.commands.output import err
from service.prices.cli import price_of_version, read_table, table_format_of, write_table
from service.provider_costs import service

provider_costs_app = typer.Typer(
    help="What each provider charges the operator (USD per 1M tokens).", no_args_is_help=True
)

ProviderOption = Annotated[
    str, typer.Option("--provider", "-p", help="The provider's name, as in the providers file.")
]


@provider_costs_app.command("import", rich_help_panel=DIRECT)
def import_costs(
    file: Annotated[Path, typer.Argument(help="CSV or YAML cost table ('-' for stdin).")],
    provider: ProviderOption,
    fmt: Annotated[
        str | None,
        typer.Option("--format", "-f", help="csv | yaml.", show_default="by extension"),
    ] = None,
) -> None:
    """Add the provider's versions (rows without effective_from take effect now).

    Versions already present are skipped; one present with other rates refuses the whole
    import. Stored ledger rows never change.
    """
    text, table_format = read_table(file, fmt)
    result = run_in_transaction(lambda s: service.import_table(s, provider, text, table_format))
    err.print(f"imported {len(result.added)} new versions, {result.unchanged} already present")


@provider_costs_app.command("export", rich_help_panel=API_CLIENTS)
def export_costs(
    provider: ProviderOption,
    fmt: Annotated[str | None, typer.Option("--format", "-f", help="csv | yaml.")] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="File to write.", show_default="stdout")
    ] = None,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """The provider's cost versions, readable back by `meterline provider-costs import`."""
    table_format = table_format_of(output, fmt)
    with BillingClient(url, token) as client:
        versions = client.request("GET", "/billing/provider-costs", params={"provider": provider})[
            "data"
        ]
    write_table(format_price_table([price_of_version(v) for v in versions], table_format), output)
