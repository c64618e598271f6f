"""`meterline report monthly`: the monthly export to a file or stdout, with progress; and
`meterline invoices unpriced`, the unpriced-usage report (API clients)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Annotated

import typer

from service.commands.api import BillingClient, TokenOption, UrlOption, download
from service.commands.output import JsonOption, PeriodOption, err, print_result

report_app = typer.Typer(help="Report exports.", no_args_is_help=True)


def _complete(fmt: str, tail: bytes) -> bool:
    """The last bytes of a whole export: the totals row (CSV) or the closing brace (JSON)."""
    if fmt == "csv":
        return tail.rstrip(b"\n").rsplit(b"\n", 1)[-1].startswith(b"total,")
    return tail.rstrip().endswith(b"}")


@report_app.command("monthly")
def monthly(
    period: PeriodOption,
    fmt: Annotated[str, typer.Option("--format", "-f", help="csv | json.")] = "csv",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="File to write.", show_default="stdout")
    ] = None,
    account_id: Annotated[str | None, typer.Option("--account-id")] = None,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """One row per account and model (and quoted task type), exact cost, invoice, totals."""
    params = {"period": str(period), "format": fmt}
    if account_id:
        params["account_id"] = account_id
    with BillingClient(url, token) as client:
        # The header and the totals line are not rows of the report.
        rows = download(
            client,
            "/billing/reports/monthly",
            params,
            output,
            str(period),
            lambda tail: _complete(fmt, tail),
            lambda lines: max(lines - 2, 0),
        )
    if output:
        err.print(f"wrote {rows} rows to {output}", highlight=False)


# `meterline invoices unpriced` (registered in `service.cli`).
def unpriced(
    period: PeriodOption,
    account_id: Annotated[uuid.UUID | None, typer.Option("--account-id")] = None,
    url: UrlOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Usage stored without a price in the month, per account and model."""
    params = {"period": str(period), **({"account_id": str(account_id)} if account_id else {})}
    with BillingClient(url, token) as client:
        report = client.request("GET", "/billing/reports/unpriced", params=params)
    columns = ["account_id", "model", "requests", "requests_priced_now", "requests_without_price"]
    print_result(report["data"], as_json, columns)
