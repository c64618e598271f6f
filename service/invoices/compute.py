"""An invoice computed: each account's draft for a month, from the ledger as it stands.

The rules live in `pricing.invoice` (lines, rounding, late usage, quoted tasks); this
module decides which usage windows each invoice bills, has them summed in SQL
(`repository.sums`, `repository.rollup`, `repository.tasks`) and prices the sums.
"""

from __future__ import annotations

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
    UsageGroup,
    apply_credits,
    build_invoice,
    uncovered_windows,
)
from pricing.prices import Price, PriceBook, PriceSegment
from pricing.rate_cards import Tariff
from service.db.engine import tune_for_aggregation
from service.invoices.repository.cutoff import CutoffRepository
from service.invoices.repository.invoices import InvoiceRepository
from service.invoices.repository.rollup import RollupRepository
from service.invoices.repository.sums import Selection, UsageSum, UsageSumRepository
from service.invoices.repository.tasks import BillableTask, TaskBillingRepository
from service.limits.credit import credit_paid
from service.tariff.service import load_tariff


@dataclass
class ComputedInvoice:
    draft: InvoiceDraft
    cutoff: datetime
    windows: list[Selection]
    # The quoted tasks it bills (marked billed when it is finalized).
    tasks: list[uuid.UUID] = field(default_factory=list)


async def _tariff(session: AsyncSession) -> Tariff:
    # Read fresh, not from the in-process cache: a price added a moment ago by another
    # worker must price this draft's unpriced rows.
    return await load_tariff(session)


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
    """Prices of summed rows: stored versions by id, and the spans of unpriced models (of
    the customer's own prices for an account on a rate card)."""

    by_id: dict[int, Price]
    segments: dict[str, list[PriceSegment]]
    # Accounts ever on a rate card: their rows' cost is theirs, not the list price's, so
    # their lines show no list rates; their unpriced rows are priced by their own spans.
    rate_carded: frozenset[uuid.UUID] = frozenset()
    own_segments: dict[uuid.UUID, dict[str, list[PriceSegment]]] = field(default_factory=dict)

    def price_of(self, s: UsageSum, kind: LineKind) -> Price | None:
        if s.segment is not None:
            # Quoted tasks' rows are repriced by the list's spans (`segments`) only.
            tasks = kind in (LineKind.TASK, LineKind.LATE_TASK)
            spans = self.segments if tasks else self.own_segments.get(s.account_id, self.segments)
            return spans[s.model][s.segment].price
        if s.account_id in self.rate_carded:
            return None
        return self.by_id.get(s.price_version_id) if s.price_version_id is not None else None

    def group(self, s: UsageSum, kind: LineKind, period: str | None = None) -> UsageGroup:
        return UsageGroup(
            kind=kind,
            model=s.model,
            price=self.price_of(s, kind),
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
    invoices = InvoiceRepository(session)
    ledger = UsageSumRepository(session)
    rollup = RollupRepository(session)
    billing = TaskBillingRepository(session)
    accounts = sorted(accounts)
    await tune_for_aggregation(session)
    cutoff = await CutoffRepository(session).usage_cutoff()
    rolled_up_to = await rollup.rolled_up_to()
    billed = await invoices.billed_windows(accounts)
    closed = await invoices.finalized_periods(accounts)
    reads = _reads(period, accounts, cutoff, rolled_up_to, billed, closed)
    own, late = reads.own, reads.late
    sums = (
        await ledger.usage_sums(own)
        + await ledger.usage_sums(late)
        + await rollup.rollup_sums(reads.from_rollup, str(period))
    )
    late_rows = await ledger.late_task_sums(own + late)
    tasks = _billable(await billing.billable_tasks(accounts, period.end), period, closed)
    at_cost = [t.id for t in tasks if t.billed_as == TaskBilling.COST]
    task_usage = await billing.task_cost_usage(at_cost, cutoff)

    tariff = await _tariff(session)
    book = tariff.list_prices
    by_id = {p.version_id: p for p in book.versions() if p.version_id is not None}
    rate_carded = frozenset(a for a in accounts if tariff.has_rate_card(a))
    own_segments: dict[uuid.UUID, dict[str, list[PriceSegment]]] = {}
    for account in sorted({s.account_id for s in sums if s.unpriced} & rate_carded):
        # Rows of an account on a rate card stored unpriced: priced by what the account
        # itself paid at their time (its rate card then, else the list price).
        models = {s.model for s in sums if s.unpriced and s.account_id == account}
        spans = {model: tariff.customer_segments(account, model) for model in sorted(models)}
        own_segments[account] = spans
        mine = [s for s in own + late if s.account_id == account]
        sums = [s for s in sums if not (s.unpriced and s.account_id == account)] + (
            await ledger.unpriced_usage_sums(mine, spans)
        )
    listed = [s for s in sums if s.account_id not in own_segments]
    segments = _segments(book, [*listed, *late_rows, *task_usage])
    if segments:
        # Rows stored without a price: summed again per span of their model's timeline, so
        # each span is priced by the version in force then (if any exists now).
        with_unpriced = {s.account_id for s in listed if s.unpriced}
        again = [s for s in own + late if s.account_id in with_unpriced]
        sums = [s for s in sums if not s.unpriced or s.account_id in own_segments] + (
            await ledger.unpriced_usage_sums(again, segments)
        )
        if any(s.unpriced for s in late_rows):
            late_rows = [s for s in late_rows if not s.unpriced] + (
                await ledger.late_task_sums(own + late, segments)
            )
        if any(s.unpriced for s in task_usage):
            task_usage = [s for s in task_usage if not s.unpriced] + (
                await billing.task_cost_usage(at_cost, cutoff, segments)
            )
    pricing = _Pricing(by_id, segments, rate_carded, own_segments)

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
    # Credit pays the usage of the months invoiced (this one's, and the earlier months whose
    # late rows this invoice bills) less what their invoices applied already.
    billed_months = {
        account: [
            (p.start, p.end)
            for p in [period, *(BillingPeriod.parse(m) for m in closed.get(account, set()))]
        ]
        for account in accounts
    }
    credit = await credit_paid(
        await session.connection(),
        accounts,
        billed_months,
        await invoices.credits_applied(accounts),
        book,
    )
    for account in accounts:
        draft = build_invoice(usage.get(account, []), task_groups.get(account, []))
        if account in credit:
            draft = apply_credits(draft, credit[account])
        # A late window that held no row need not be kept: rows recorded up to the cutoff
        # are all visible now, so it can never hold one later.
        windows = reads.windows[account]
        windows += [
            s for s in late_by_account.get(account, []) if (account, s.period) in late_with_rows
        ]
        computed[account] = ComputedInvoice(draft, cutoff, windows, tasks_of.get(account, []))
    return computed
