"""`meterline report monthly`: the monthly export to a file or stdout, with progress; and
`meterline invoices unpriced`, the unpriced-usage report (API clients)."""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path
from typing import Annotated, BinaryIO

import typer
from rich.progress import (
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)

from service.commands.api import BillingClient, TokenOption, UrlOption
from service.commands.output import JsonOption, PeriodOption, err, fail, print_result

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
    # A file appears only once complete: a cut export never passes for a whole one.
    partial = output.with_name(output.name + ".part") if output else None
    try:
        sink: BinaryIO = partial.open("wb") if partial else sys.stdout.buffer
    except OSError as exc:
        fail(f"cannot write {output}: {exc.strerror or exc}")
    lines = 0
    tail = b""
    progress = Progress(
        SpinnerColumn(),
        TextColumn("exporting {task.fields[period]}: {task.fields[rows]} rows"),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    )
    complete = False
    try:
        with BillingClient(url, token) as client, progress:
            task = progress.add_task("export", total=None, period=period, rows=0)
            with client.stream("/billing/reports/monthly", params) as response:
                for chunk in response.iter_bytes():
                    sink.write(chunk)
                    lines += chunk.count(b"\n")
                    tail = (tail + chunk)[-4096:]
                    progress.update(task, advance=len(chunk), rows=max(lines - 2, 0))
        complete = _complete(fmt, tail)
    finally:
        if partial:
            sink.close()
            if complete and output:
                os.replace(partial, output)
            else:
                partial.unlink(missing_ok=True)
    if not complete:
        fail("the export ended early (server error or connection cut); nothing written")
    if output:
        # The header and the totals line are not rows of the report.
        err.print(f"wrote {max(lines - 2, 0)} rows to {output}", highlight=False)


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
