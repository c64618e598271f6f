"""`meterline quote`: a fixed price for one task (an API client: `service/commands/api.py`)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from service.commands.api import AccountOption, BillingClient, TokenOption, UrlOption
from service.commands.output import print_json


def quote(
    task_type: Annotated[str, typer.Option(help="The task type, e.g. summarize.")],
    model: Annotated[str, typer.Option(help="The model the task runs on.")],
    account_id: AccountOption = None,
    prompt_tokens: Annotated[int | None, typer.Option(help="For an estimate.")] = None,
    max_completion_tokens: Annotated[int | None, typer.Option(help="For an estimate.")] = None,
    confidence: Annotated[
        str | None, typer.Option(help="Quantile the price covers.", show_default="0.9")
    ] = None,
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
