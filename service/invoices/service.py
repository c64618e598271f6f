"""Invoices: generate (or refresh) drafts, finalize with a gapless number, void.

The rules live in `pricing.invoice` (lines, rounding, late usage, quoted tasks);
`compute` loads the sums they need, and this module stores the result. Every change to an account's
invoices happens under a lock on the account row, and finalizing regenerates the draft
under that lock before freezing it, so two invoices can never bill the same ledger row.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from pricing.invoice import (
    BillingPeriod,
    InvoiceDraft,
    UnpricedUsage,
)
from service.accounts.repository import AccountRepository
from service.auth.principal import Principal
from service.db.models import Invoice, NumberSeries
from service.errors import BadRequest, Conflict, NotFound
from service.invoices.compute import ComputedInvoice, compute_invoices
from service.invoices.flagged import refuse_unreviewed_flagged_usage
from service.invoices.pdf import Issuer, pdf_filename, render_invoice_pdf
from service.invoices.repository.cutoff import CutoffRepository, LedgerWriter
from service.invoices.repository.invoices import InvoiceRepository
from service.invoices.repository.tasks import TaskBillingRepository
from service.invoices.schemas import InvoiceOut, invoice_out
from service.schemas import Page, decode_cursor, keyset_page
from service.tasks.expiry import expire_tasks
from service.webhooks.events import EventType
from service.webhooks.outbox import raise_event

log = logging.getLogger("meterline.invoices")

# How long finalize waits for open ledger writes of the month before refusing.
FINALIZE_WAIT_S = 5.0


class PeriodInFuture(BadRequest):
    code = "period_in_future"
    description = "A month that has not begun."


class InvoiceFinalized(Conflict):
    code = "invoice_finalized"
    description = "The month's invoice is finalized and never changes: void it first."


class InvoiceNotDraft(Conflict):
    code = "invoice_not_draft"
    description = "Only a draft is finalized."


class PeriodNotOver(Conflict):
    code = "period_not_over"
    description = "The month is not over: its usage is still arriving."


class LedgerWriteInProgress(Conflict):
    code = "ledger_write_in_progress"
    description = (
        "A ledger write begun before the month ended is still open after"
        " `METERLINE_INVOICE_FINALIZE_WAIT_S`; the message names the session."
    )


class UsageWithoutPrice(Conflict):
    code = "unpriced_usage"
    description = "Usage of models without a price remains (the message names them)."


class InvoiceNotFinalized(Conflict):
    code = "invoice_not_finalized"
    description = "Only a finalized invoice is voided."


@dataclass
class GenerateResult:
    invoice_ids: dict[uuid.UUID, uuid.UUID] = field(default_factory=dict)  # account → invoice
    created: set[uuid.UUID] = field(default_factory=set)  # invoice ids that are new
    finalized: dict[uuid.UUID, Invoice] = field(default_factory=dict)  # account → left as is


# -- storing ------------------------------------------------------------------------------


def _unpriced_json(unpriced: Sequence[UnpricedUsage]) -> list[dict[str, object]]:
    return [
        {
            "model": u.model,
            "period": u.period,
            "task_type": u.task_type,
            "requests": u.totals.requests,
            "prompt_tokens": u.totals.prompt_tokens,
            "completion_tokens": u.totals.completion_tokens,
        }
        for u in unpriced
    ]


def _line_values(invoice_id: uuid.UUID, draft: InvoiceDraft) -> list[dict[str, Any]]:
    return [
        {
            "invoice_id": invoice_id,
            "position": position,
            "kind": line.kind.value,
            "description": line.description,
            "model": line.model,
            "task_type": line.task_type,
            "period": line.period,
            "price_version_id": line.price_version_id,
            "quantity": line.quantity,
            "prompt_tokens": line.prompt_tokens,
            "completion_tokens": line.completion_tokens,
            "cached_tokens": line.cached_tokens,
            "input_usd_per_mtok": line.input_usd_per_mtok,
            "output_usd_per_mtok": line.output_usd_per_mtok,
            "cached_input_usd_per_mtok": line.cached_input_usd_per_mtok,
            "unit_price_usd": line.unit_price_usd,
            "amount_exact_usd": line.amount_exact_usd,
            "amount_usd": line.amount_usd,
        }
        for position, line in enumerate(draft.lines, start=1)
    ]


async def _store(
    repository: InvoiceRepository,
    period: BillingPeriod,
    computed: dict[uuid.UUID, ComputedInvoice],
    drafts: dict[uuid.UUID, Invoice],
) -> GenerateResult:
    result = GenerateResult()
    new_values = []
    refreshed = []
    for account, c in computed.items():
        values = {
            "total_usd": c.draft.total_usd,
            "usage_cutoff": c.cutoff,
            "unpriced_usage": _unpriced_json(c.draft.unpriced),
        }
        if account in drafts:
            refreshed.append({"b_id": drafts[account].id, **values})
            result.invoice_ids[account] = drafts[account].id
        else:
            new_values.append(
                {"account_id": account, "period": str(period), "status": "draft", **values}
            )
    await repository.update_drafts(refreshed)
    created = await repository.insert_invoices(new_values)
    result.invoice_ids.update(created)
    result.created = set(created.values())
    lines: list[dict[str, Any]] = []
    windows: list[dict[str, Any]] = []
    for account, c in computed.items():
        invoice_id = result.invoice_ids[account]
        lines.extend(_line_values(invoice_id, c.draft))
        windows.extend(
            {
                "invoice_id": invoice_id,
                "period": s.period,
                "recorded_after": s.window.after,
                "recorded_until": s.window.until,
            }
            for s in c.windows
        )
    await repository.insert_lines(lines)
    await repository.insert_windows(windows)
    return result


# -- the operations -----------------------------------------------------------------------


async def generate(
    session: AsyncSession,
    period: BillingPeriod,
    account_ids: Sequence[uuid.UUID] | None = None,
    now: datetime | None = None,
) -> GenerateResult:
    """Create or refresh the drafts of `period` for these accounts (default: every account
    that existed before the period ended), as of `now` (default: the database's). Open
    quoted tasks past their deadline expire first. Finalized invoices are left as they are
    and reported in `finalized`."""
    repository = InvoiceRepository(session)
    now = now or await repository.now()
    if period > BillingPeriod.of(now):
        raise PeriodInFuture(
            f"period {period} has not begun; invoices are for past or current months",
            param="body.period",
        )
    if account_ids is None:
        account_ids = await repository.account_ids(created_before=period.end)
    accounts = await repository.lock_accounts(account_ids)
    missing = set(account_ids) - set(accounts)
    if missing:
        raise NotFound(f"account {sorted(missing)[0]} not found", param="body.account_id")
    await expire_tasks(session, now, accounts)
    live = await repository.live_invoices(accounts, str(period))
    finalized = {a: i for a, i in live.items() if i.status == "finalized"}
    drafts = {a: i for a, i in live.items() if i.status == "draft"}
    targets = [a for a in accounts if a not in finalized]
    computed = await compute_invoices(session, period, targets)
    result = await _store(repository, period, computed, drafts)
    result.finalized = finalized
    log.info(
        "event=invoices_generated period=%s drafts=%d created=%d skipped_finalized=%d",
        period,
        len(result.invoice_ids),
        len(result.created),
        len(finalized),
    )
    return result


async def generate_one(
    session: AsyncSession, account_id: uuid.UUID, period: BillingPeriod, now: datetime | None = None
) -> tuple[Invoice, bool]:
    """The account's draft for `period`, made or refreshed; True when it is new."""
    result = await generate(session, period, [account_id], now)
    if account_id in result.finalized:
        invoice = result.finalized[account_id]
        raise InvoiceFinalized(
            f"the invoice of {period} is finalized ({invoice.number}) and never changes;"
            " void it to issue a new one"
        )
    invoice_id = result.invoice_ids[account_id]
    return await get(session, invoice_id), invoice_id in result.created


def invoice_not_found(invoice_id: uuid.UUID) -> NotFound:
    return NotFound(f"invoice {invoice_id} not found", param="path.invoice_id")


async def get(session: AsyncSession, invoice_id: uuid.UUID) -> Invoice:
    invoice = await InvoiceRepository(session).get(invoice_id)
    if invoice is None:
        raise invoice_not_found(invoice_id)
    return invoice


async def get_for(session: AsyncSession, caller: Principal, invoice_id: uuid.UUID) -> Invoice:
    """One invoice as the caller may see it: another account's answers as a missing one."""
    invoice = await get(session, invoice_id)
    caller.require_account(invoice.account_id, invoice_not_found(invoice_id))
    return invoice


async def list_invoices(
    session: AsyncSession,
    caller: Principal,
    account_id: uuid.UUID | None,
    period: BillingPeriod | None,
    status: str | None,
    limit: int,
    cursor: str | None,
) -> Page[InvoiceOut]:
    """Invoices newest month first, a page at a time; a customer key sees its own only."""
    scoped = caller.scope(account_id)
    after = decode_cursor(cursor, str, uuid.UUID) if cursor else None
    month = str(period) if period else None
    invoices = await InvoiceRepository(session).list(
        scoped, month, status, limit + 1, (after[0], after[1]) if after else None
    )
    return keyset_page(
        Page[InvoiceOut], invoices, limit, invoice_out, lambda i: (i.period, str(i.id))
    )


async def invoice_document(
    session: AsyncSession, caller: Principal, invoice_id: uuid.UUID, issuer: Issuer
) -> tuple[bytes, str]:
    """The invoice as a PDF and its file name, for a caller allowed to read it."""
    invoice = invoice_out(await get_for(session, caller, invoice_id))
    account = await AccountRepository(session).get_account(invoice.account_id)
    customer = account.name if account else str(invoice.account_id)
    # Drawing a long invoice takes CPU time: off the event loop, so the proxy keeps flowing.
    document = await asyncio.to_thread(render_invoice_pdf, invoice, customer, issuer)
    return document, pdf_filename(invoice)


async def _locked(repository: InvoiceRepository, invoice_id: uuid.UUID) -> Invoice:
    """The invoice, read after its account is locked."""
    account = await repository.account_of(invoice_id)
    if account is None:
        raise invoice_not_found(invoice_id)
    locked = await repository.lock_accounts([account])
    invoice = await repository.get(invoice_id)
    if invoice is None or account not in locked:
        raise invoice_not_found(invoice_id)
    return invoice


def _writer_text(writer: LedgerWriter | None, period: BillingPeriod) -> str:
    if writer is None:
        return f"the database's clock has not reached the end of {period}"
    if writer.xact_start is None:
        return (
            f"a ledger write of another database role (pid {writer.pid}) whose start this"
            " role cannot see (grant it pg_read_all_stats)"
        )
    name = f", {writer.application_name!r}" if writer.application_name else ""
    return (
        f"a transaction writing the ledger (pid {writer.pid}{name}) has been open since"
        f" {writer.xact_start.isoformat()}, before the month ended"
    )


async def _wait_for_month_written(
    repository: CutoffRepository, period: BillingPeriod, now: datetime, wait_s: float
) -> None:
    """Return once every ledger write that began before the month ended has committed (the
    cutoff has reached the month's end); refuse (409) if one is still open after `wait_s`:
    freezing now would leave its rows of the month to a later invoice, as late usage."""
    deadline = time.monotonic() + wait_s
    while True:
        cutoff = await repository.usage_cutoff()
        if cutoff >= period.end:
            return
        if time.monotonic() >= deadline:
            writer = await repository.oldest_ledger_writer()
            if writer is not None and writer.xact_start is not None:
                writer = writer if writer.xact_start < period.end else None
            raise LedgerWriteInProgress(
                f"usage of {period} may still be arriving: {_writer_text(writer, period)},"
                f" so the ledger is complete only up to {cutoff.isoformat()}."
                " Finalize again once it has committed"
            )
        await asyncio.sleep(0.1)


async def finalize(
    session: AsyncSession,
    invoice_id: uuid.UUID,
    now: datetime | None = None,
    wait_s: float = FINALIZE_WAIT_S,
) -> Invoice:
    """Regenerate the draft from the ledger as it stands at `now`, freeze it, and number it;
    the quoted tasks it bills are marked billed by it.

    Refused (409) when the invoice is not a draft, when its month is not over, when a write
    to the ledger that began before the month ended is still open after `wait_s` seconds,
    and when usage without any price remains (the message names the models).
    """
    repository = InvoiceRepository(session)
    invoice = await _locked(repository, invoice_id)
    if invoice.status != "draft":
        raise InvoiceNotDraft(
            f"invoice {invoice.number or invoice.id} is {invoice.status}; only a draft is finalized"
        )
    period = BillingPeriod.parse(invoice.period)
    now = now or await repository.now()
    if now < period.end:
        raise PeriodNotOver(
            f"{period} is not over until {period.end.isoformat()}; its usage is still arriving"
        )
    await _wait_for_month_written(CutoffRepository(session), period, now, wait_s)
    await expire_tasks(session, now, [invoice.account_id])
    await refuse_unreviewed_flagged_usage(session, invoice.account_id, period)
    computed = (await compute_invoices(session, period, [invoice.account_id]))[invoice.account_id]
    if not computed.draft.finalizable:
        models = ", ".join(computed.draft.unpriced_models())
        raise UsageWithoutPrice(
            f"usage of models without a price blocks finalization: {models}."
            " Add a price in force at that usage's time (POST /billing/prices) and finalize again"
        )
    await _store(repository, period, {invoice.account_id: computed}, {invoice.account_id: invoice})
    number = await repository.next_number(NumberSeries.INVOICE, now.year)
    label = f"{NumberSeries.INVOICE}-{now.year}-{number:06d}"
    await repository.mark_finalized(invoice.id, label, now)
    await TaskBillingRepository(session).mark_tasks_billed(
        invoice.id, computed.tasks, computed.cutoff
    )
    log.info(
        "event=invoice_finalized invoice_id=%s number=%s account_id=%s period=%s total_usd=%s",
        invoice.id,
        label,
        invoice.account_id,
        period,
        computed.draft.total_usd,
    )
    finalized = await get(session, invoice.id)
    await raise_event(
        session, EventType.INVOICE_FINALIZED, _event_data(finalized), invoice.account_id
    )
    return finalized


def _event_data(invoice: Invoice) -> dict[str, Any]:
    """What `invoice.*` webhooks say of an invoice (GET /billing/invoices/{id} has the rest)."""
    return {
        "invoice_id": str(invoice.id),
        "number": invoice.number,
        "account_id": str(invoice.account_id),
        "period": invoice.period,
        "status": invoice.status.value,
        "currency": invoice.currency,
        "total_usd": f"{invoice.total_usd:f}",
        "void_reason": invoice.void_reason,
    }


async def void(
    session: AsyncSession, invoice_id: uuid.UUID, reason: str, now: datetime | None = None
) -> Invoice:
    """Void a finalized invoice: it keeps its number and lines, bills nothing any more (its
    usage windows and tasks are free again), and a new draft may be generated for its month."""
    repository = InvoiceRepository(session)
    invoice = await _locked(repository, invoice_id)
    if invoice.status != "finalized":
        message = (
            "a draft is not voided: generate it again, or leave it"
            if invoice.status == "draft"
            else f"invoice {invoice.number} is already void"
        )
        raise InvoiceNotFinalized(message)
    await repository.mark_void(invoice.id, reason, now or await repository.now())
    await TaskBillingRepository(session).release_tasks(invoice.id)
    log.info("event=invoice_voided invoice_id=%s number=%s", invoice.id, invoice.number)
    voided = await get(session, invoice.id)
    await raise_event(session, EventType.INVOICE_VOIDED, _event_data(voided), invoice.account_id)
    return voided
