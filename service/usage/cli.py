"""`meterline usage`: totals by day, model, key, task… from the command line."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from service.commands.api import BillingClient, TokenOption, UrlOption
from service.commands.output import JsonOption, print_json, print_table
from service.usage.schemas import GROUP_FIELDS, GROUPS

TOTAL_COLUMNS = ["requests", "prompt_tokens", "completion_tokens", "total_tokens", "cost_usd"]


def usage(
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
