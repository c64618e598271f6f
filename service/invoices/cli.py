"""`meterline invoices …`: `finalize`, `void` and `show` are clients of the billing API
(`service/commands/api.py`; `unpriced` is `service.reports.cli`'s); `generate` (every
account's drafts in one transaction, which the API has no endpoint for) and `rollup` go
straight to the database (`service/commands/database.py`)."""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Annotated, Any

import typer
from sqlalchemy.ext.asyncio import AsyncSession

from pricing.invoice import BillingPeriod
from service.commands.api import API_CLIENTS, ApiError, BillingClient, TokenOption, UrlOption
from service.commands.database import DIRECT, run_in_transaction
from service.commands.output import (
    JsonOption,
    PeriodOption,
    err,
    parse_period,
    print_error,
    print_json,
    print_table,
)
from service.invoices import service
from service.invoices.repository.invoices import InvoiceRepository
from service.invoices.rollup import RollUp, roll_up
from service.invoices.schemas import GenerateSummary, invoice_out

invoices_app = typer.Typer(
    help="Monthly invoices (generate and rollup straight to the database).", no_args_is_help=True
)

LINE_COLUMNS = ["kind", "description", "quantity", "amount_exact_usd", "amount_usd"]


def _show(invoice: dict[str, Any], as_json: bool) -> None:
    """An invoice as the API answers it (`InvoiceOut`'s JSON)."""
    if as_json:
        print_json(invoice)
        return
    title = (
        f"{invoice['number'] or 'draft'} · account {invoice['account_id']} · {invoice['period']}"
        f" · {invoice['status']} · total ${invoice['total_usd']}"
    )
    print_table(invoice["lines"], LINE_COLUMNS, title)
    for u in invoice["unpriced_usage"]:
        late = f", late from {u['period']}" if u["period"] else ""
        err.print(
            f"[yellow]unpriced:[/] {u['model']} ({u['requests']} requests{late})"
            " blocks finalization"
        )
    if invoice["void_reason"]:
        err.print(f"void: {invoice['void_reason']}")


@invoices_app.command("generate", rich_help_panel=DIRECT)
def generate(
    period: PeriodOption,
    account_id: Annotated[
        list[uuid.UUID] | None,
        typer.Option("--account-id", help="Only this account (repeatable).", show_default="all"),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Make or refresh the month's drafts; finalized invoices are left as they are."""

    async def work(session: AsyncSession) -> tuple[GenerateSummary, list[dict[str, Any]]]:
        result = await service.generate(session, period, account_id)
        invoices = await InvoiceRepository(session).get_many(list(result.invoice_ids.values()))
        summary = GenerateSummary(
            period=str(period),
            drafts=len(result.invoice_ids),
            created=len(result.created),
            skipped_finalized=len(result.finalized),
            total_usd=sum((i.total_usd for i in invoices), Decimal("0.00")),
        )
        shown = [invoice_out(i).model_dump(mode="json") for i in invoices] if account_id else []
        return summary, shown

    summary, shown = run_in_transaction(work)
    if as_json:
        print_json(
            {
                **summary.model_dump(mode="json"),
                "invoices": shown,
            }
        )
        return
    for invoice in shown:
        _show(invoice, as_json=False)
    err.print(
        f"{summary.period}: {summary.drafts} drafts ({summary.created} new),"
        f" {summary.skipped_finalized} finalized left as they are, total ${summary.total_usd}"
    )


@invoices_app.command("finalize", rich_help_panel=API_CLIENTS)
def finalize(
    invoice_ids: Annotated[
        list[uuid.UUID] | None, typer.Argument(help="Invoices to finalize.", show_default=False)
    ] = None,
    period: Annotated[
        BillingPeriod | None,
        typer.Option(
            parser=parse_period, metavar="YYYY-MM", help="Finalize every draft of this month."
        ),
    ] = None,
    url: UrlOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Refresh, freeze and number drafts, each on its own (admin)."""
    ids = [str(i) for i in invoice_ids or []]
    done: list[dict[str, Any]] = []
    failed = 0
    with BillingClient(url, token) as client:
        if period is not None:
            drafts = client.pages(
                "/billing/invoices", {"period": str(period), "status": "draft", "limit": 200}
            )
            ids.extend(str(i["id"]) for i in list(drafts))
        for invoice_id in ids:
            try:
                done.append(client.attempt("POST", f"/billing/invoices/{invoice_id}/finalize"))
            except ApiError as exc:
                print_error(f"{invoice_id} not finalized: {exc.message}")
                failed += 1
    if as_json:
        print_json(done)
    elif done:
        print_table(done, ["id", "number", "account_id", "period", "total_usd"])
    elif not failed:
        err.print("nothing to finalize")
    if failed:
        raise typer.Exit(1)


@invoices_app.command("void", rich_help_panel=API_CLIENTS)
def void(
    invoice_id: Annotated[uuid.UUID, typer.Argument(help="A finalized invoice.")],
    reason: Annotated[str, typer.Option(help="Why; kept on the invoice.")],
    url: UrlOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Void a finalized invoice (admin): it keeps its number; the month may be invoiced again."""
    with BillingClient(url, token) as client:
        invoice = client.request(
            "POST", f"/billing/invoices/{invoice_id}/void", json={"reason": reason}
        )
    _show(invoice, as_json)


@invoices_app.command("show", rich_help_panel=API_CLIENTS)
def show(
    invoice_id: Annotated[uuid.UUID, typer.Argument(help="The invoice.")],
    url: UrlOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """An invoice and its lines."""
    with BillingClient(url, token) as client:
        _show(client.request("GET", f"/billing/invoices/{invoice_id}"), as_json)


@invoices_app.command("rollup", rich_help_panel=DIRECT)
def rollup() -> None:
    """Fold the ledger rows recorded since the last time into the usage rollup now (the
    server does it every METERLINE_USAGE_ROLLUP_INTERVAL_S seconds)."""

    async def work(session: AsyncSession) -> RollUp | None:
        return await roll_up(session)

    done = run_in_transaction(work)
    assert done is not None
    err.print(
        f"rolled up {done.rows:,} ledger rows recorded up to {done.until.isoformat()}"
        f" in {done.seconds:.1f} s"
    )
