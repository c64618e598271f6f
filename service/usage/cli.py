"""`meterline usage`: totals by day, model, key, task… from the command line; and
`meterline usage export`, every ledger row of a range to a file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, get_args

import typer

from service.commands.api import BillingClient, TokenOption, UrlOption, download
from service.commands.output import JsonOption, err, print_json, print_table
from service.usage.schemas import GROUP_FIELDS, GROUPS, ExportFormat

TOTAL_COLUMNS = ["requests", "prompt_tokens", "completion_tokens", "total_tokens", "cost_usd"]


usage_app = typer.Typer(invoke_without_command=True)


@usage_app.callback()
def usage(
    ctx: typer.Context,
    group_by: Annotated[
        str | None,
        typer.Option("--group-by", "-g", help=f"Comma-separated: {', '.join(GROUPS)}."),
    ] = None,
    start: Annotated[str | None, typer.Option(help="RFC 3339 or a date, inclusive.")] = None,
    end: Annotated[str | None, typer.Option(help="RFC 3339 or a date, exclusive.")] = None,
    account_id: Annotated[str | None, typer.Option("--account-id")] = None,
    key_id: Annotated[str | None, typer.Option("--key-id")] = None,
    task_id: Annotated[str | None, typer.Option("--task-id")] = None,
    model: Annotated[str | None, typer.Option()] = None,
    limit: Annotated[int, typer.Option(help="Most groups shown.")] = 1000,
    url: UrlOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Requests, tokens and exact cost over [start, end), grouped as asked."""
    if ctx.invoked_subcommand is not None:
        return
    params: dict[str, Any] = {
        name: value
        for name, value in {
            "group_by": group_by,
            "start": start,
            "end": end,
            "account_id": account_id,
            "key_id": key_id,
            "task_id": task_id,
            "model": model,
            "limit": limit,
        }.items()
        if value is not None
    }
    with BillingClient(url, token) as client:
        report = client.request("GET", "/billing/usage", params=params)
    if as_json:
        print_json(report)
        return
    fields: dict[str, str] = {str(group): field for group, field in GROUP_FIELDS.items()}
    groups = [p.strip() for p in (group_by or "").split(",") if p.strip() in fields]
    columns = [fields[g] for g in dict.fromkeys(groups)] + TOTAL_COLUMNS
    print_table(report["data"], columns)
    if report.get("has_more"):
        typer.echo(f"(only the first {limit} groups; narrow the range or raise --limit)", err=True)


@usage_app.command("export")
def export(
    start: Annotated[str, typer.Option(help="RFC 3339 or a date, inclusive.")],
    end: Annotated[str, typer.Option(help="RFC 3339 or a date, exclusive; ≤ 366 days on.")],
    fmt: Annotated[
        str, typer.Option("--format", "-f", help=" | ".join(get_args(ExportFormat)) + ".")
    ] = "csv",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="File to write.", show_default="stdout")
    ] = None,
    account_id: Annotated[str | None, typer.Option("--account-id")] = None,
    key_id: Annotated[str | None, typer.Option("--key-id")] = None,
    task_id: Annotated[str | None, typer.Option("--task-id")] = None,
    model: Annotated[str | None, typer.Option()] = None,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Every ledger row in [start, end), the columns of the usage events, to a file."""
    params: dict[str, Any] = {
        name: value
        for name, value in {
            "start": start,
            "end": end,
            "format": fmt,
            "account_id": account_id,
            "key_id": key_id,
            "task_id": task_id,
            "model": model,
        }.items()
        if value is not None
    }
    # Progress counts lines: a CSV row per line but for cells holding line breaks, a JSON
    # Lines row per line, none in Parquet. A cut stream fails in `download`; a whole Parquet
    # file ends with its magic bytes.
    header = {"csv": 1, "jsonl": 0}.get(fmt)
    with BillingClient(url, token) as client:
        download(
            client,
            "/billing/usage/events/export",
            params,
            output,
            f"{start} to {end}",
            lambda tail: fmt != "parquet" or tail.endswith(b"PAR1"),
            lambda lines: 0 if header is None else max(lines - header, 0),
        )
    if output:
        err.print(f"wrote {output.stat().st_size:,} bytes to {output}", highlight=False)
