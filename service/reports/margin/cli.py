"""`meterline report margin`: the margin report of a month, as a table or JSON."""

from __future__ import annotations

from typing import Annotated

import typer

from service.commands.api import BillingClient, TokenOption, UrlOption
from service.commands.output import JsonOption, print_json, print_table

COLUMNS = [
    "task_type",
    "model",
    "tasks",
    "succeeded",
    "revenue_usd",
    "cost_usd",
    "margin_usd",
    "margin_pct",
    "confidence",
    "within_quantile_share",
    "within_price_share",
]


def margin(
    period: Annotated[str, typer.Option(help="The month, YYYY-MM (UTC).")],
    account_id: Annotated[str | None, typer.Option("--account-id")] = None,
    as_json: JsonOption = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Quoted tasks completed in the month per task type and model: revenue, cost, calibration."""
    params = {"period": period}
    if account_id:
        params["account_id"] = account_id
    with BillingClient(url, token) as client:
        report = client.request("GET", "/billing/reports/margin", params=params)
    if as_json:
        print_json(report)
        return
    total = {**report["total"], "task_type": "total", "model": ""}
    print_table([*report["rows"], total], COLUMNS, title=f"Margin {period}")
