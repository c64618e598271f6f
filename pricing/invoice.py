"""Invoices built from aggregates: lines, the one rounding, and which usage each invoice covers.

Money rules
-----------
Each line keeps its exact amount (the exact sum of the costs of the rows or tasks behind it)
and is rounded once, to cents, half away from zero; the invoice total is the sum of the
rounded lines. Nothing here does I/O: the service sums the ledger in SQL and hands the
sums over.

Which ledger rows an invoice bills (the late-usage rule)
--------------------------------------------------------
A ledger row belongs to the usage period (UTC calendar month) of its `occurred_at` and
carries `recorded_at`, the database time it was inserted. An invoice records, per usage
period, the `recorded_at` windows `(after, until]` it bills (`BilledWindow`); only the
windows of *finalized* invoices count as billed (a draft is recomputed, a void one bills
nothing). When the invoice of account A for period Q is (re)generated with cutoff C (a
watermark below which no row can still be uncommitted):

1. Own usage: the rows of Q recorded in `(-inf, C]` minus the windows of Q already billed
   (only possible after a void, when earlier late-usage lines for Q stay billed where they are).
2. Late usage: for each earlier period P < Q whose invoice is finalized, the rows of P
   recorded in `(-inf, C]` minus the windows of P already billed, i.e. rows that arrived
   after P's invoice (and after any earlier late-usage line for P) was finalized. They become
   `late_usage` lines labelled with P. Several finalized months, and late rows arriving
   after the next invoice too, all follow from the same subtraction.
3. Periods without a finalized invoice contribute no late usage: their rows wait for their
   own invoice, whose window 1 will hold them.

The service finalizes by regenerating under a per-account lock and freezing the result, so
the billed windows of one period never overlap: every row is billed by exactly one
finalized invoice, never twice, and none is lost (`uncovered_windows` is the subtraction).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from functools import total_ordering

from pricing.cost import TokenUsage, totals_cost
from pricing.money import exact, round_cents
from pricing.price_table import format_rate
from pricing.prices import BEGINNING_OF_TIME, END_OF_TIME, Price

# The one spelling of a month, `YYYY-MM`; schemas that document it (OpenAPI) quote this.
PERIOD_PATTERN = r"^(\d{4})-(0[1-9]|1[0-2])$"
_PERIOD = re.compile(PERIOD_PATTERN)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@total_ordering
class BillingPeriod:
    """A UTC calendar month, written `YYYY-MM`.

    A value like a frozen dataclass, but not one: FastAPI reads a dataclass parameter as a
    body, and a period is a query parameter too.
    """

    __slots__ = ("month", "year")
    year: int
    month: int

    def __init__(self, year: int, month: int) -> None:
        object.__setattr__(self, "year", year)
        object.__setattr__(self, "month", month)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"a BillingPeriod does not change ({name})")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BillingPeriod):
            return NotImplemented
        return (self.year, self.month) == (other.year, other.month)

    def __lt__(self, other: BillingPeriod) -> bool:
        return (self.year, self.month) < (other.year, other.month)

    def __hash__(self) -> int:
        return hash((self.year, self.month))

    def __repr__(self) -> str:
        return f"BillingPeriod(year={self.year}, month={self.month})"

    def __reduce__(self) -> tuple[type[BillingPeriod], tuple[int, int]]:
        return BillingPeriod, (self.year, self.month)  # copy and pickle, past __setattr__

    @classmethod
    def parse(cls, text: str) -> BillingPeriod:
        """`"2026-01"` → BillingPeriod(2026, 1); anything else raises ValueError.

        Only the months Meterline can bill: from 1970-01 to 9999-11, the last one whose
        `end` a datetime can hold (9999-12 would fail later, on its bounds).
        """
        match = _PERIOD.fullmatch(text)  # `$` alone would let a trailing line feed through
        month = (int(match.group(1)), int(match.group(2))) if match else None
        first = (BEGINNING_OF_TIME.year, BEGINNING_OF_TIME.month)
        if month is None or not first <= month < (END_OF_TIME.year, END_OF_TIME.month):
            raise ValueError(
                f"period must be a month YYYY-MM from 1970-01 to 9999-11, got {text!r}"
            )
        return cls(*month)

    @classmethod
    def of(cls, at: datetime) -> BillingPeriod:
        """The period holding the instant `at`; a naive datetime raises ValueError (read in
        the machine's zone, it would land hours off, in the wrong month)."""
        if at.tzinfo is None:
            raise ValueError(f"a month needs an instant; {at.isoformat()} has no zone")
        at = at.astimezone(UTC)
        return cls(at.year, at.month)

    @property
    def start(self) -> datetime:
        """First instant of the month (inclusive)."""
        return datetime(self.year, self.month, 1, tzinfo=UTC)

    @property
    def end(self) -> datetime:
        """First instant of the next month (exclusive)."""
        return self.next().start

    def shifted(self, months: int) -> BillingPeriod:
        """The month `months` later (earlier when negative)."""
        year, month = divmod(self.year * 12 + self.month - 1 + months, 12)
        return BillingPeriod(year, month + 1)

    def next(self) -> BillingPeriod:
        """The following month."""
        return self.shifted(1)

    def previous(self) -> BillingPeriod:
        """The month before."""
        return self.shifted(-1)

    def __str__(self) -> str:
        return f"{self.year:04d}-{self.month:02d}"


@dataclass(frozen=True, slots=True)
class BilledWindow:
    """Rows recorded in `(after, until]` (after None: since the beginning of time)."""

    after: datetime | None
    until: datetime

    def contains(self, recorded_at: datetime) -> bool:
        """Whether a row recorded at `recorded_at` falls in this window."""
        return (self.after is None or recorded_at > self.after) and recorded_at <= self.until


def uncovered_windows(cutoff: datetime, billed: Iterable[BilledWindow]) -> list[BilledWindow]:
    """`(-inf, cutoff]` minus the `billed` windows, as sorted disjoint windows.

    The heart of the late-usage rule: what a new invoice may bill of one period is exactly
    what no finalized invoice has billed yet, up to the new cutoff.
    """
    spans = sorted(
        (w for w in billed if w.after is None or w.after < w.until),
        key=lambda w: (w.after is not None, w.after or _EPOCH),
    )
    free: list[BilledWindow] = []
    covered_to: datetime | None = None  # everything up to here is billed or handed out
    for window in spans:
        if covered_to is not None and covered_to >= cutoff:
            break
        if window.after is not None and (covered_to is None or window.after > covered_to):
            free.append(BilledWindow(covered_to, min(window.after, cutoff)))
        covered_to = window.until if covered_to is None else max(covered_to, window.until)
    if covered_to is None or covered_to < cutoff:
        free.append(BilledWindow(covered_to, cutoff))
    return free


class InvoiceStatus(StrEnum):
    """A draft is recomputed at will; a finalized invoice never changes; a void one bills
    nothing (its month may be invoiced again)."""

    DRAFT = "draft"
    FINALIZED = "finalized"
    VOID = "void"


class LineKind(StrEnum):
    TOKENS = "tokens"
    TASK = "task"
    LATE_USAGE = "late_usage"
    # A quoted task of an earlier month whose invoice was finalized without it, or rows of a
    # task billed at cost that reached the ledger after it was billed.
    LATE_TASK = "late_task"
    ADJUSTMENT = "adjustment"
    # What prepaid credit paid of the invoice's usage: negative, the last line.
    CREDITS_APPLIED = "credits_applied"


class TaskOutcome(StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    # Still open at its deadline (`expires_at`): nobody reported an outcome.
    EXPIRED = "expired"


class TaskStatus(StrEnum):
    """A task is open until its outcome is reported or it expires (`TaskOutcome`)."""

    OPEN = "open"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    EXPIRED = "expired"


class FailedTaskPolicy(StrEnum):
    """An account's billing of its failed quoted tasks."""

    FREE = "free"
    COST = "cost"


class ExpiredTaskPolicy(StrEnum):
    """An account's billing of its quoted tasks that expired open."""

    FIXED_PRICE = "fixed_price"
    COST = "cost"
    FREE = "free"


class TaskBilling(StrEnum):
    """How one completed quoted task is billed; fixed when it completes (`task_billing`)."""

    FIXED_PRICE = "fixed_price"
    COST = "cost"
    FREE = "free"


def task_billing(
    outcome: TaskOutcome, failed: FailedTaskPolicy, expired: ExpiredTaskPolicy
) -> TaskBilling:
    """The outcome-based billing rule: a succeeded task is billed its fixed price, a failed
    one by the account's failed-task policy (free by default, else its token cost), an
    expired one by its expired-task policy (its fixed price by default).

    Decided once, with the account's policies in force at completion, and stored on the
    task: invoices, exports and the margin report all bill what was decided then.
    """
    if outcome is TaskOutcome.SUCCEEDED:
        return TaskBilling.FIXED_PRICE
    if outcome is TaskOutcome.FAILED:
        return TaskBilling.COST if failed is FailedTaskPolicy.COST else TaskBilling.FREE
    return TaskBilling(expired.value)


def task_charge(
    billing: TaskBilling, count: int, fixed_price_usd: Decimal | None, cost_usd: Decimal
) -> Decimal:
    """What `count` completed quoted tasks billed `billing` (with one fixed price) are
    billed, exactly: the fixed price each, their token cost (the exact cost of the rows
    they cover), or nothing."""
    if billing is TaskBilling.FIXED_PRICE:
        if fixed_price_usd is None:
            raise ValueError("tasks billed their fixed price have none")
        return fixed_price_usd * count
    return cost_usd if billing is TaskBilling.COST else Decimal(0)


@dataclass(frozen=True, slots=True)
class UsageTotals:
    """Summed ledger rows; `cached_tokens` was clamped row by row (`countable_cached_tokens`)."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def __add__(self, other: UsageTotals) -> UsageTotals:
        return UsageTotals(
            self.requests + other.requests,
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.cached_tokens + other.cached_tokens,
        )

    def __sub__(self, other: UsageTotals) -> UsageTotals:
        return UsageTotals(
            self.requests - other.requests,
            self.prompt_tokens - other.prompt_tokens,
            self.completion_tokens - other.completion_tokens,
            self.cached_tokens - other.cached_tokens,
        )

    def as_usage(self) -> TokenUsage:
        return TokenUsage(self.prompt_tokens, self.completion_tokens, self.cached_tokens)


@dataclass(frozen=True, slots=True)
class UsageGroup:
    """Ledger rows of one model and one price version, summed in SQL.

    `stored_cost_usd` is the exact sum of the costs stored on the rows when they were
    written. None means the rows were unpriced in the ledger: they are priced here from
    their token sums at `price` (the version in force at their `occurred_at`, found now);
    if `price` is None too, they are still unpriced and block finalization.
    """

    kind: LineKind
    model: str
    price: Price | None
    totals: UsageTotals
    stored_cost_usd: Decimal | None
    # LATE_USAGE only: the period the rows belong to.
    period: str | None = None

    @property
    def is_unpriced(self) -> bool:
        return self.stored_cost_usd is None and self.price is None

    def exact_cost(self) -> Decimal:
        """The rows' exact cost: stored, or computed now from the token sums."""
        if self.stored_cost_usd is not None:
            return self.stored_cost_usd
        if self.price is None:
            raise ValueError(f"usage of {self.model} has no price")
        return totals_cost(self.totals.as_usage(), self.price)


@dataclass(frozen=True, slots=True)
class QuotedTaskGroup:
    """Quoted tasks of one type and model, one outcome and one billing, on this invoice.

    Tasks billed their fixed price are grouped by it too; tasks billed at cost carry the
    ledger usage they cover; free ones bill nothing. `period` is set for tasks of an earlier
    month whose invoice was finalized without them. `late_rows` groups carry no task
    (`count` 0), only rows of tasks billed at cost earlier that reached the ledger after.
    """

    task_type: str | None
    model: str | None
    outcome: TaskOutcome
    billing: TaskBilling
    count: int
    fixed_price_usd: Decimal | None = None
    usage: tuple[UsageGroup, ...] = ()
    period: str | None = None
    late_rows: bool = False


@dataclass(frozen=True, slots=True)
class UnpricedUsage:
    """Usage no price covers, even now: it blocks finalization until a price exists."""

    model: str
    totals: UsageTotals
    period: str | None = None  # set for late usage of an earlier period
    task_type: str | None = None  # set for the usage of a failed task billed at cost


@dataclass(frozen=True, slots=True)
class InvoiceLineDraft:
    kind: LineKind
    description: str
    quantity: int
    amount_exact_usd: Decimal
    amount_usd: Decimal
    model: str | None = None
    task_type: str | None = None
    period: str | None = None
    price_version_id: int | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    input_usd_per_mtok: Decimal | None = None
    output_usd_per_mtok: Decimal | None = None
    cached_input_usd_per_mtok: Decimal | None = None
    unit_price_usd: Decimal | None = None


@dataclass(frozen=True, slots=True)
class InvoiceDraft:
    lines: tuple[InvoiceLineDraft, ...]
    total_usd: Decimal
    total_exact_usd: Decimal
    unpriced: tuple[UnpricedUsage, ...] = field(default=())

    @property
    def finalizable(self) -> bool:
        return not self.unpriced

    def unpriced_models(self) -> list[str]:
        """Models whose usage has no price, sorted, each once."""
        return sorted({u.model for u in self.unpriced})


_KIND_ORDER = {
    LineKind.TOKENS: 0,
    LineKind.ADJUSTMENT: 1,
    LineKind.TASK: 2,
    LineKind.LATE_USAGE: 3,
    LineKind.LATE_TASK: 4,
    LineKind.CREDITS_APPLIED: 5,
}


def apply_credits(draft: InvoiceDraft, paid_exact_usd: Decimal) -> InvoiceDraft:
    """The draft with a `credits_applied` line: minus what credit paid of its usage (never
    more than the exact total), rounded once like any line, so the amount due is what the
    credit did not cover. No credit, no line."""
    with exact():
        amount = -min(max(paid_exact_usd, Decimal(0)), max(draft.total_exact_usd, Decimal(0)))
        if amount == 0:
            return draft
        line = InvoiceLineDraft(
            kind=LineKind.CREDITS_APPLIED,
            description="Prepaid credits applied",
            quantity=1,
            amount_exact_usd=amount,
            amount_usd=round_cents(amount),
        )
        return replace(
            draft,
            lines=(*draft.lines, line),
            total_usd=draft.total_usd + line.amount_usd,
            total_exact_usd=draft.total_exact_usd + amount,
        )


def build_invoice(
    usage: Iterable[UsageGroup], tasks: Iterable[QuotedTaskGroup] = ()
) -> InvoiceDraft:
    """Lines from aggregates: one per (kind, period, model, price version) for token usage;
    for quoted tasks one per (period, outcome, task type, model, fixed price) billed their
    fixed price and one per (period, outcome, task type, model) billed at cost (free ones
    bill nothing), each a `late_task` line when it belongs to an earlier month.

    Each line's exact amount is the exact sum of what it covers; it is rounded once; the
    total is the sum of the rounded lines. Groups without any price are left out of the
    lines and listed in `unpriced`.
    """
    with exact():
        usage = list(usage)
        unpriced = _unpriced(usage)
        lines = _usage_lines(usage)
        for group in _merge_task_groups(tasks):
            line = _task_line(group)
            if line is None:
                continue
            lines.append(line)
            unpriced.extend(
                UnpricedUsage(u.model, u.totals, task_type=group.task_type)
                for u in group.usage
                if u.is_unpriced
            )
        lines.sort(key=_line_order)
        total = sum((line.amount_usd for line in lines), Decimal("0.00"))
        total_exact = sum((line.amount_exact_usd for line in lines), Decimal(0))
    return InvoiceDraft(tuple(lines), total, total_exact, tuple(_merge_unpriced(unpriced)))


def _merge_task_groups(tasks: Iterable[QuotedTaskGroup]) -> list[QuotedTaskGroup]:
    """One group per line: by period, outcome, billing, type and model, and by fixed price
    for tasks billed it."""
    merged: dict[tuple[object, ...], QuotedTaskGroup] = {}
    for group in tasks:
        price = group.fixed_price_usd if group.billing is TaskBilling.FIXED_PRICE else None
        key = (
            group.period,
            group.late_rows,
            group.outcome,
            group.billing,
            group.task_type,
            group.model,
            price,
        )
        previous = merged.get(key)
        merged[key] = (
            replace(group, fixed_price_usd=price)
            if previous is None
            else replace(
                previous, count=previous.count + group.count, usage=previous.usage + group.usage
            )
        )
    return list(merged.values())


def _unpriced(usage: Sequence[UsageGroup]) -> list[UnpricedUsage]:
    return [
        UnpricedUsage(g.model, g.totals, period=g.period if g.kind is LineKind.LATE_USAGE else None)
        for g in usage
        if g.is_unpriced
    ]


def _merge_unpriced(unpriced: Iterable[UnpricedUsage]) -> list[UnpricedUsage]:
    merged: dict[tuple[str, str | None, str | None], UsageTotals] = {}
    for u in unpriced:
        key = (u.model, u.period, u.task_type)
        merged[key] = merged.get(key, UsageTotals()) + u.totals
    return [
        UnpricedUsage(model, totals, period, task_type)
        for (model, period, task_type), totals in sorted(
            merged.items(), key=lambda kv: tuple(k or "" for k in kv[0])
        )
    ]


def _usage_lines(usage: Iterable[UsageGroup]) -> list[InvoiceLineDraft]:
    merged: dict[tuple[LineKind, str | None, str, Price | None], tuple[UsageTotals, Decimal]] = {}
    for group in usage:
        if group.is_unpriced:
            continue
        period = group.period if group.kind is LineKind.LATE_USAGE else None
        key = (group.kind, period, group.model, group.price)
        totals, amount = merged.get(key, (UsageTotals(), Decimal(0)))
        merged[key] = (totals + group.totals, amount + group.exact_cost())
    return [
        _usage_line(kind, period, model, price, totals, amount)
        for (kind, period, model, price), (totals, amount) in merged.items()
    ]


def _usage_line(
    kind: LineKind,
    period: str | None,
    model: str,
    price: Price | None,
    totals: UsageTotals,
    amount: Decimal,
) -> InvoiceLineDraft:
    tokens = (
        f"{totals.prompt_tokens:,} prompt + {totals.completion_tokens:,} completion tokens"
        f" in {totals.requests:,} request{'' if totals.requests == 1 else 's'}"
    )
    if price is not None:
        rates = (
            f"${format_rate(price.input_usd_per_mtok)} input"
            f" / ${format_rate(price.output_usd_per_mtok)} output per 1M tokens"
        )
        if price.cached_input_usd_per_mtok is not None and totals.cached_tokens:
            rates += f" (${format_rate(price.cached_input_usd_per_mtok)} cached input)"
        tokens += f" at {rates}"
    prefix = {
        LineKind.TOKENS: "",
        LineKind.ADJUSTMENT: "Adjustment: ",
        LineKind.LATE_USAGE: f"Late usage from {period}: ",
    }[kind]
    # An adjustment of the whole account names no model (`service.adjustments`).
    what = (
        f"{model}, {tokens}"
        if model
        else f"{totals.requests:,} account adjustment" + ("" if totals.requests == 1 else "s")
    )
    return InvoiceLineDraft(
        kind=kind,
        description=f"{prefix}{what}",
        quantity=totals.requests,
        amount_exact_usd=amount,
        amount_usd=round_cents(amount),
        model=model,
        period=period,
        price_version_id=price.version_id if price else None,
        prompt_tokens=totals.prompt_tokens,
        completion_tokens=totals.completion_tokens,
        cached_tokens=totals.cached_tokens,
        input_usd_per_mtok=price.input_usd_per_mtok if price else None,
        output_usd_per_mtok=price.output_usd_per_mtok if price else None,
        cached_input_usd_per_mtok=price.cached_input_usd_per_mtok if price else None,
    )


def _task_line(group: QuotedTaskGroup) -> InvoiceLineDraft | None:
    """The outcome-based billing rule, in one place (`task_billing` decided how).

    A task billed its fixed price is billed none of its tokens; one billed at cost is billed
    the exact cost of the rows it covers; a free one nothing. The tokens of quoted tasks
    never appear on token lines (the service leaves them out of the usage sums).
    """
    what = group.task_type or "task"
    on = group.model or "any model"
    outcome = "expired open" if group.outcome is TaskOutcome.EXPIRED else group.outcome.value
    kind = LineKind.TASK if group.period is None else LineKind.LATE_TASK
    late = "" if group.period is None else f"Late from {group.period}: "
    if group.billing is TaskBilling.FIXED_PRICE and not group.late_rows:
        amount = task_charge(group.billing, group.count, group.fixed_price_usd, Decimal(0))
        return InvoiceLineDraft(
            kind=kind,
            description=(
                f"{late}{group.count:,} x {what} on {on} at ${group.fixed_price_usd} each"
                f" (fixed price, {outcome})"
            ),
            quantity=group.count,
            amount_exact_usd=amount,
            amount_usd=round_cents(amount),
            model=group.model,
            task_type=group.task_type,
            period=group.period,
            unit_price_usd=group.fixed_price_usd,
        )
    if group.billing is not TaskBilling.COST or not (group.count or group.usage):
        return None
    priced = [u for u in group.usage if not u.is_unpriced]
    totals = sum((u.totals for u in group.usage), UsageTotals())
    cost = sum((u.exact_cost() for u in priced), Decimal(0))
    amount = task_charge(group.billing, group.count, group.fixed_price_usd, cost)
    tokens = f"{totals.prompt_tokens:,} prompt + {totals.completion_tokens:,} completion tokens"
    if group.late_rows:
        description = (
            f"{late}token cost of {outcome} {what} tasks on {on} recorded after they were"
            f" billed ({tokens} in {totals.requests:,} requests)"
        )
    else:
        description = (
            f"{late}{group.count:,} x {outcome} {what} on {on}, billed at token cost ({tokens})"
        )
    return InvoiceLineDraft(
        kind=kind,
        description=description[0].upper() + description[1:],
        quantity=totals.requests if group.late_rows else group.count,
        amount_exact_usd=amount,
        amount_usd=round_cents(amount),
        model=group.model,
        task_type=group.task_type,
        period=group.period,
        prompt_tokens=totals.prompt_tokens,
        completion_tokens=totals.completion_tokens,
        cached_tokens=totals.cached_tokens,
    )


def _line_order(line: InvoiceLineDraft) -> tuple[object, ...]:
    return (
        _KIND_ORDER[line.kind],
        line.period or "",
        line.task_type or "",
        line.model or "",
        line.unit_price_usd is None,
        line.unit_price_usd or Decimal(0),
        line.price_version_id or 0,
    )
