"""`meterline invoices generate|finalize|void|show|rollup`, straight to the database (a
direct-database command: `service/commands/database.py`; `unpriced` is `service.reports.cli`'s)."""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Annotated

import typer
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.commands.database import run_in_transaction, run_with_database
from service.commands.output import JsonOption, err, print_json, print_table
from service.db.engine import transaction
from service.errors import MeterlineError
from service.invoices import service
from service.invoices.repository.invoices import InvoiceRepository
from service.invoices.rollup import RollUp, roll_up
from service.invoices.schemas import GenerateSummary, InvoiceOut, invoice_out
from service.settings import get_settings

invoices_app = typer.Typer(help="Monthly invoices.", no_args_is_help=True)

LINE_COLUMNS = ["kind", "description", "quantity", "amount_exact_usd", "amount_usd"]


def _show(invoice: InvoiceOut, as_json: bool) -> None:
    if as_json:
        print_json(invoice.model_dump(mode="json"))
        return
    title = (
        f"{invoice.number or 'draft'} · account {invoice.account_id} · {invoice.period}"
        f" · {invoice.status} · total ${invoice.total_usd}"
    )
    print_table([line.model_dump(mode="json") for line in invoice.lines], LINE_COLUMNS, title)
    for u in invoice.unpriced_usage:
        err.print(
            f"[yellow]unpriced:[/] {u.model} ({u.requests} requests"
            f"{', late from ' + u.period if u.period else ''}) blocks finalization"
        )
    if invoice.void_reason:
        err.print(f"void: {invoice.void_reason}")


@invoices_app.command("generate")
def generate(
    period: Annotated[str, typer.Option(help="The month, YYYY-MM (UTC).")],
    account_id: Annotated[
        list[uuid.UUID] | None,
        typer.Option("--account-id", help="Only this account (repeatable).", show_default="all"),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Make or refresh the month's drafts; finalized invoices are left as they are."""

    async def work(session: AsyncSession) -> tuple[GenerateSummary, list[InvoiceOut]]:
        result = await service.generate(session, service.parse_period(period), account_id)
        invoices = await InvoiceRepository(session).get_many(list(result.invoice_ids.values()))
        summary = GenerateSummary(
            period=period,
            drafts=len(result.invoice_ids),
            created=len(result.created),
            skipped_finalized=len(result.finalized),
            total_usd=sum((i.total_usd for i in invoices), Decimal("0.00")),
        )
        shown = [invoice_out(i) for i in invoices] if account_id else []
        return summary, shown

    summary, shown = run_in_transaction(work)
    if as_json:
        print_json(
            {
                **summary.model_dump(mode="json"),
                "invoices": [i.model_dump(mode="json") for i in shown],
            }
        )
        return
    for invoice in shown:
        _show(invoice, as_json=False)
    err.print(
        f"{summary.period}: {summary.drafts} drafts ({summary.created} new),"
        f" {summary.skipped_finalized} finalized left as they are, total ${summary.total_usd}"
    )


@invoices_app.command("finalize")
def finalize(
    invoice_ids: Annotated[
        list[uuid.UUID] | None, typer.Argument(help="Invoices to finalize.", show_default=False)
    ] = None,
    period: Annotated[
        str | None, typer.Option(help="Finalize every draft of this month (YYYY-MM).")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Refresh, freeze and number drafts, each in its own transaction."""
    ids = list(invoice_ids or [])
    wait_s = get_settings().invoice_finalize_wait_s

    async def work(
        sessions: async_sessionmaker[AsyncSession],
    ) -> tuple[list[InvoiceOut], list[str]]:
        if period is not None:
            async with transaction(sessions) as session:
                month = str(service.parse_period(period))
                rows = await InvoiceRepository(session).list(None, month, "draft", 10**6, None)
                ids.extend(i.id for i in rows)
        done, failed = [], []
        for invoice_id in ids:
            try:
                async with transaction(sessions) as session:
                    finalized = await service.finalize(session, invoice_id, wait_s=wait_s)
                    done.append(invoice_out(finalized))
            except MeterlineError as exc:
                failed.append(f"{invoice_id}: {exc.message}")
        return done, failed

    done, failed = run_with_database(work)
    for message in failed:
        err.print(f"[red]not finalized[/] {message}")
    if as_json:
        print_json([i.model_dump(mode="json") for i in done])
    elif done:
        rows = [i.model_dump(mode="json") for i in done]
        print_table(rows, ["id", "number", "account_id", "period", "total_usd"])
    elif not failed:
        err.print("nothing to finalize")
    if failed:
        raise typer.Exit(1)


@invoices_app.command("void")
def void(
    invoice_id: Annotated[uuid.UUID, typer.Argument(help="A finalized invoice.")],
    reason: Annotated[str, typer.Option(help="Why; kept on the invoice.")],
    as_json: JsonOption = False,
) -> None:
    """Void a finalized invoice: it keeps its number; the month may be invoiced again."""

    async def work(session: AsyncSession) -> InvoiceOut:
        return invoice_out(await service.void(session, invoice_id, reason))

    _show(run_in_transaction(work), as_json)


@invoices_app.command("show")
def show(
    invoice_id: Annotated[uuid.UUID, typer.Argument(help="The invoice.")],
    as_json: JsonOption = False,
) -> None:
    """An invoice and its lines."""

    async def work(session: AsyncSession) -> InvoiceOut:
        return invoice_out(await service.get(session, invoice_id))

    _show(run_in_transaction(work), as_json)


@invoices_app.command("rollup")
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
