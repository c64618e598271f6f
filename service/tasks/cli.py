"""`meterline tasks`: list, show and complete tasks; `meterline quote`: price a task."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from service.api_client import (
    BillingClient,
    JsonOption,
    TokenOption,
    UrlOption,
    print_json,
    print_table,
)

tasks_app = typer.Typer(help="Tasks (X-Task-Id) and their outcome.", no_args_is_help=True)

COLUMNS = ["id", "task_type", "model", "status", "fixed_price_usd", "requests", "cost_usd"]
AccountOption = Annotated[
    str | None, typer.Option("--account-id", help="Required with the admin token.")
]


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
    if as_json:
        print_json(rows)
    else:
        print_table(rows, COLUMNS)


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


def quote(
    task_type: Annotated[str, typer.Option(help="The task type, e.g. summarize.")],
    model: Annotated[str, typer.Option(help="The model the task runs on.")],
    account_id: AccountOption = None,
    prompt_tokens: Annotated[int | None, typer.Option(help="For an estimate.")] = None,
    max_completion_tokens: Annotated[int | None, typer.Option(help="For an estimate.")] = None,
    confidence: Annotated[str | None, typer.Option(help="Quantile, default 0.9.")] = None,
    accept: Annotated[bool, typer.Option(help="Accept it at once and print the task.")] = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Quote a fixed price for one task (and optionally accept it)."""
    body: dict[str, Any] = {"task_type": task_type, "model": model}
    for name, value in (
        ("account_id", account_id),
        ("prompt_tokens", prompt_tokens),
        ("max_completion_tokens", max_completion_tokens),
        ("confidence", confidence),
    ):
        if value is not None:
            body[name] = value
    with BillingClient(url, token) as client:
        result = client.request("POST", "/billing/quotes", json=body)
        if accept:
            result = client.request("POST", f"/billing/quotes/{result['id']}/accept", json={})
    print_json(result)
