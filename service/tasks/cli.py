"""`meterline tasks`: list and complete tasks (an API client: `service/commands/api.py`)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from service.commands.api import AccountOption, BillingClient, TokenOption, UrlOption
from service.commands.output import JsonOption, print_json, print_result

tasks_app = typer.Typer(help="Tasks (X-Task-Id) and their outcome.", no_args_is_help=True)

COLUMNS = ["id", "task_type", "model", "status", "fixed_price_usd", "requests", "cost_usd"]


@tasks_app.command("list")
def list_tasks(
    account_id: AccountOption = None,
    status: Annotated[str | None, typer.Option(help="open | succeeded | failed | expired")] = None,
    limit: Annotated[int, typer.Option(help="At most this many tasks.")] = 50,
    as_json: JsonOption = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Tasks newest first, with their usage."""
    params: dict[str, Any] = {"limit": min(limit, 200)}
    if account_id:
        params["account_id"] = account_id
    if status:
        params["status"] = status
    with BillingClient(url, token) as client:
        rows = []
        for row in client.pages("/billing/tasks", params):
            rows.append(row)
            if len(rows) >= limit:
                break
    print_result(rows, as_json, COLUMNS)


@tasks_app.command("complete")
def complete(
    task_id: Annotated[str, typer.Argument(help="The X-Task-Id.")],
    outcome: Annotated[str, typer.Argument(help="succeeded | failed")],
    account_id: AccountOption = None,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Record a task's outcome; the proxy refuses its further requests."""
    params = {"account_id": account_id} if account_id else {}
    with BillingClient(url, token) as client:
        task = client.request(
            "POST", f"/billing/tasks/{task_id}/complete", params=params, json={"outcome": outcome}
        )
    print_json(task)
