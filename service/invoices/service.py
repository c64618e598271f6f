"""Invoices: generate (or refresh) drafts, finalize with a gapless number, void.

The rules live in `pricing.invoice` (lines, rounding, late usage, quoted tasks); this
module loads the sums they need and stores the result. Every change to an account's
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
    BilledWindow,
    BillingPeriod,
    InvoiceDraft,
    LineKind,
    QuotedTaskGroup,
    TaskBilling,
    TaskOutcome,
    UnpricedUsage,
    UsageGroup,
    build_invoice,
    uncovered_windows,
)
from pricing.prices import Price, PriceBook, PriceSegment
from service.accounts.repository import AccountRepository
from service.auth.principal import Principal
from service.db.models import Invoice
from service.errors import BadRequest, Conflict, NotFound
from service.invoices.pdf import Issuer, pdf_filename, render_invoice_pdf
from service.invoices.repository import (
    BillableTask,
    InvoiceRepository,
    LedgerWriter,
    Selection,
    UsageSum,
)
from service.invoices.schemas import InvoiceOut, UnpricedReportRow, invoice_out
from service.prices.repository import PriceRepository
from service.review.finalization import refuse_unreviewed_flagged_usage
from service.schemas import Page, decode_cursor, encode_cursor
from service.tasks.expiry import expire_tasks

log = logging.getLogger("meterline.invoices")

# How long finalize waits for open ledger writes of the month before refusing.
FINALIZE_WAIT_S = 5.0


class InvalidPeriod(BadRequest):
    code = "invalid_period"
    description = "Not a month Meterline bills (`YYYY-MM`, 1970-01 to 9999-11)."


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
class ComputedInvoice:
    draft: InvoiceDraft
    cutoff: datetime
    windows: list[Selection]
    # The quoted tasks it bills (marked billed when it is finalized).
    tasks: list[uuid.UUID] = field(default_factory=list)


@dataclass
class GenerateResult:
    invoice_ids: dict[uuid.UUID, uuid.UUID] = field(default_factory=dict)  # account → invoice
    created: set[uuid.UUID] = field(default_factory=set)  # invoice ids that are new
    finalized: dict[uuid.UUID, Invoice] = field(default_factory=dict)  # account → left as is


def parse_period(text: str) -> BillingPeriod:
    try:
        return BillingPeriod.parse(text)
    except ValueError as exc:
        raise InvalidPeriod(str(exc), param="query.period") from None


# -- computing ----------------------------------------------------------------------------


async def _price_book(session: AsyncSession) -> PriceBook:
    # Read fresh, not from the in-process cache: a price added a moment ago by another
    # worker must price this draft's unpriced rows.
    return PriceBook(await PriceRepository(session).all_prices())


@dataclass
class _Reads:
    """What to read for each account's invoice, and the windows it will bill."""

    own: list[Selection] = field(default_factory=list)
    late: list[Selection] = field(default_factory=list)
    # Accounts whose own month is read from the rollup (plus the ledger since its watermark).
    from_rollup: list[uuid.UUID] = field(default_factory=list)
    windows: dict[uuid.UUID, list[Selection]] = field(default_factory=dict)


def _reads(
    period: BillingPeriod,
    accounts: Sequence[uuid.UUID],
    cutoff: datetime,
    rolled_up_to: datetime,
    billed: dict[uuid.UUID, dict[str, list[BilledWindow]]],
    closed: dict[uuid.UUID, set[str]],
) -> _Reads:
    """What each account's invoice bills: its own period, and late usage of closed periods.

    The usual own window, everything recorded up to the cutoff, is read from the rollup
    (rows recorded up to its watermark) plus the ledger: the rows the rollup leaves out, and
    the rows recorded since its watermark. Any other window is read from the ledger.
    """
    reads = _Reads()
    label = str(period)
    for account in accounts:
        account_billed = billed.get(account, {})
        windows = [
            Selection(account, label, period.start, period.end, window)
            for window in uncovered_windows(cutoff, account_billed.get(label, []))
        ]
        reads.windows[account] = list(windows)
        usual = [s.window for s in windows] == [BilledWindow(None, cutoff)]
        if usual and rolled_up_to <= cutoff:
            reads.from_rollup.append(account)
            month = (account, label, period.start, period.end)
            windows = [Selection(*month, BilledWindow(None, rolled_up_to), unrolled_only=True)]
            if rolled_up_to < cutoff:
                windows.append(Selection(*month, BilledWindow(rolled_up_to, cutoff)))
        reads.own += windows
        for earlier in sorted(closed.get(account, set())):
            past = BillingPeriod.parse(earlier)
            if past >= period:
                continue
            for window in uncovered_windows(cutoff, account_billed.get(earlier, [])):
                reads.late.append(Selection(account, earlier, past.start, past.end, window))
    return reads


def _segments(book: PriceBook, sums: Sequence[UsageSum]) -> dict[str, list[PriceSegment]]:
    return {model: book.segments(model) for model in sorted({s.model for s in sums if s.unpriced})}


@dataclass(frozen=True)
class _Pricing:
    """Prices of summed rows: stored versions by id, and the spans of unpriced models."""

    by_id: dict[int, Price]
    segments: dict[str, list[PriceSegment]]

    def price_of(self, s: UsageSum) -> Price | None:
        if s.segment is not None:
            return self.segments[s.model][s.segment].price
        return self.by_id.get(s.price_version_id) if s.price_version_id is not None else None

    def group(self, s: UsageSum, kind: LineKind, period: str | None = None) -> UsageGroup:
        return UsageGroup(
            kind=kind,
            model=s.model,
            price=self.price_of(s),
            totals=s.totals,
            stored_cost_usd=None if s.unpriced else s.stored_cost_usd,
            period=period,
        )


def _usage_group(s: UsageSum, period: BillingPeriod, pricing: _Pricing) -> UsageGroup:
    usage_period = s.bucket[0]
    if usage_period is not None and usage_period != str(period):
        return pricing.group(s, LineKind.LATE_USAGE, usage_period)
    kind = LineKind.ADJUSTMENT if s.ledger_kind == "adjustment" else LineKind.TOKENS
    return pricing.group(s, kind)


def _task_groups(
    tasks: Sequence[BillableTask],
    task_usage: Sequence[UsageSum],
    late_rows: Sequence[UsageSum],
    period: BillingPeriod,
    pricing: _Pricing,
) -> dict[uuid.UUID, list[QuotedTaskGroup]]:
    """Per account: the tasks it bills, grouped into lines, and the late rows of tasks
    billed at cost before. A task of an earlier month is labelled with its month."""

    def label(task_period: str | None) -> str | None:
        return None if task_period == str(period) else task_period

    usage: dict[tuple[Any, ...], list[UsageGroup]] = {}
    for s in task_usage:
        usage.setdefault((s.account_id, *s.bucket), []).append(pricing.group(s, LineKind.TASK))
    counts: dict[tuple[Any, ...], int] = {}
    for t in tasks:
        billing = TaskBilling(t.billed_as)
        price = t.fixed_price_usd if billing is TaskBilling.FIXED_PRICE else None
        key = (t.account_id, t.period, t.outcome, t.task_type, t.model, billing, price)
        counts[key] = counts.get(key, 0) + 1
    groups: dict[uuid.UUID, list[QuotedTaskGroup]] = {}
    for (account, task_period, outcome, task_type, model, billing, price), count in counts.items():
        rows = usage.get((account, task_period, outcome, task_type, model), [])
        groups.setdefault(account, []).append(
            QuotedTaskGroup(
                task_type,
                model,
                TaskOutcome(outcome),
                billing,
                count,
                price,
                usage=tuple(rows) if billing is TaskBilling.COST else (),
                period=label(task_period),
            )
        )
    for s in late_rows:
        _, task_period, outcome, task_type, model = s.bucket
        assert outcome is not None
        groups.setdefault(s.account_id, []).append(
            QuotedTaskGroup(
                task_type,
                model,
                TaskOutcome(outcome),
                TaskBilling.COST,
                0,
                usage=(pricing.group(s, LineKind.LATE_TASK),),
                period=label(task_period),
                late_rows=True,
            )
        )
    return groups


def _billable(
    tasks: Sequence[BillableTask], period: BillingPeriod, closed: dict[uuid.UUID, set[str]]
) -> list[BillableTask]:
    """The tasks this period's invoice bills: completed in it, or in an earlier month whose
    invoice was finalized without them. Tasks of an earlier month still open for invoicing
    wait for that month's invoice, as its late rows do."""
    label = str(period)
    return [
        t
        for t in tasks
        if t.period == label or (t.period < label and t.period in closed.get(t.account_id, ()))
    ]


async def compute_invoices(
    session: AsyncSession, period: BillingPeriod, accounts: Sequence[uuid.UUID]
) -> dict[uuid.UUID, ComputedInvoice]:
    """Each account's invoice for `period` as the ledger stands now (accounts locked).

    The ledger is read up to the cutoff, whatever `now` a caller works with: a row belongs
    to an invoice by when it was recorded, and only committed rows may be billed."""
    repository = InvoiceRepository(session)
    accounts = sorted(accounts)
    await repository.tune_for_aggregation()
    cutoff = await repository.usage_cutoff()
    rolled_up_to = await repository.rolled_up_to()
    billed = await repository.billed_windows(accounts)
    closed = await repository.finalized_periods(accounts)
    reads = _reads(period, accounts, cutoff, rolled_up_to, billed, closed)
    own, late = reads.own, reads.late
    sums = (
        await repository.usage_sums(own)
        + await repository.usage_sums(late)
        + await repository.rollup_sums(reads.from_rollup, str(period))
    )
    late_rows = await repository.late_task_sums(own + late)
    tasks = _billable(await repository.billable_tasks(accounts, period.end), period, closed)
    at_cost = [t.id for t in tasks if t.billed_as == TaskBilling.COST]
    task_usage = await repository.task_cost_usage(at_cost, cutoff)

    book = await _price_book(session)
    by_id = {p.version_id: p for p in book.versions() if p.version_id is not None}
    segments = _segments(book, [*sums, *late_rows, *task_usage])
    if segments:
        # Rows stored without a price: summed again per span of their model's timeline, so
        # each span is priced by the version in force then (if any exists now).
        with_unpriced = {s.account_id for s in sums if s.unpriced}
        again = [s for s in own + late if s.account_id in with_unpriced]
        sums = [s for s in sums if not s.unpriced] + (
            await repository.unpriced_usage_sums(again, segments)
        )
        if any(s.unpriced for s in late_rows):
            late_rows = [s for s in late_rows if not s.unpriced] + (
                await repository.late_task_sums(own + late, segments)
            )
        if any(s.unpriced for s in task_usage):
            task_usage = [s for s in task_usage if not s.unpriced] + (
                await repository.task_cost_usage(at_cost, cutoff, segments)
            )
    pricing = _Pricing(by_id, segments)

    usage: dict[uuid.UUID, list[UsageGroup]] = {}
    late_with_rows: set[tuple[uuid.UUID, str | None]] = set()
    for s in sums:
        usage.setdefault(s.account_id, []).append(_usage_group(s, period, pricing))
        late_with_rows.add((s.account_id, s.bucket[0]))
    late_with_rows |= {(s.account_id, s.bucket[0]) for s in late_rows}
    task_groups = _task_groups(tasks, task_usage, late_rows, period, pricing)
    tasks_of: dict[uuid.UUID, list[uuid.UUID]] = {}
    for t in tasks:
        tasks_of.setdefault(t.account_id, []).append(t.id)

    late_by_account: dict[uuid.UUID, list[Selection]] = {}
    for selection in late:
        late_by_account.setdefault(selection.account_id, []).append(selection)
    computed = {}
    for account in accounts:
        draft = build_invoice(usage.get(account, []), task_groups.get(account, []))
        # A late window that held no row need not be kept: rows recorded up to the cutoff
        # are all visible now, so it can never hold one later.
        windows = reads.windows[account]
        windows += [
            s for s in late_by_account.get(account, []) if (account, s.period) in late_with_rows
        ]
        computed[account] = ComputedInvoice(draft, cutoff, windows, tasks_of.get(account, []))
    return computed


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
    period: str | None,
    status: str | None,
    limit: int,
    cursor: str | None,
) -> Page[InvoiceOut]:
    """Invoices newest month first, a page at a time; a customer key sees its own only."""
    scoped = caller.scope(account_id)
    after = decode_cursor(cursor, str, uuid.UUID) if cursor else None
    invoices = await InvoiceRepository(session).list(
        scoped, period, status, limit + 1, (after[0], after[1]) if after else None
    )
    page = invoices[:limit]
    more = len(invoices) > limit
    return Page[InvoiceOut](
        data=[invoice_out(i) for i in page],
        has_more=more,
        next_cursor=encode_cursor(page[-1].period, str(page[-1].id)) if more else None,
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
    repository: InvoiceRepository, period: BillingPeriod, now: datetime, wait_s: float
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
    await _wait_for_month_written(repository, period, now, wait_s)
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
    number = await repository.next_number(now.year)
    label = f"INV-{now.year}-{number:06d}"
    await repository.mark_finalized(invoice.id, label, now)
    await repository.mark_tasks_billed(invoice.id, computed.tasks, computed.cutoff)
    log.info(
        "event=invoice_finalized invoice_id=%s number=%s account_id=%s period=%s total_usd=%s",
        invoice.id,
        label,
        invoice.account_id,
        period,
        computed.draft.total_usd,
    )
    return await get(session, invoice.id)


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
    await repository.release_tasks(invoice.id)
    log.info("event=invoice_voided invoice_id=%s number=%s", invoice.id, invoice.number)
    return await get(session, invoice.id)


async def unpriced_report(
    session: AsyncSession, period: BillingPeriod, account_id: uuid.UUID | None
) -> list[UnpricedReportRow]:
    """Ledger rows of `period` stored without a price, per account and model, with how many
    a price added since would now cover."""
    repository = InvoiceRepository(session)
    rows = await repository.unpriced_rows(period.start, period.end, account_id)
    if not rows:
        return []
    book = await _price_book(session)
    segments = {model: book.segments(model) for model in sorted({r.model for r in rows})}
    priced_now: dict[tuple[uuid.UUID, str], int] = {}
    for r in await repository.unpriced_rows(period.start, period.end, account_id, segments):
        assert r.segment is not None
        if segments[r.model][r.segment].price is not None:
            key = (r.account_id, r.model)
            priced_now[key] = priced_now.get(key, 0) + r.totals.requests
    report = []
    for r in rows:
        covered = priced_now.get((r.account_id, r.model), 0)
        report.append(
            UnpricedReportRow(
                account_id=r.account_id,
                model=r.model,
                requests=r.totals.requests,
                prompt_tokens=r.totals.prompt_tokens,
                completion_tokens=r.totals.completion_tokens,
                first_occurred_at=r.first_occurred_at,
                last_occurred_at=r.last_occurred_at,
                requests_priced_now=covered,
                requests_without_price=r.totals.requests - covered,
            )
        )
    return report
