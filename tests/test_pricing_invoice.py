"""The pure invoice builder and the late-usage rule, checked by properties (hypothesis).

Ledger rows are generated, priced as the proxy does (`usage_cost` with the version in
force at the row's time, or left unpriced), summed as the invoice query does (per model
and version, cached tokens clamped per row), and turned into an invoice. The invariants
are those of the issue: no cent appears or vanishes, rounding happens once, regenerating
gives the same invoice, a later price changes nothing.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pricing.cost import TokenUsage, countable_cached_tokens, totals_cost, usage_cost
from pricing.invoice import (
    BilledWindow,
    BillingPeriod,
    ExpiredTaskPolicy,
    FailedTaskPolicy,
    LineKind,
    QuotedTaskGroup,
    TaskBilling,
    TaskOutcome,
    UsageGroup,
    UsageTotals,
    build_invoice,
    task_billing,
    task_charge,
    uncovered_windows,
)
from pricing.money import round_cents
from pricing.prices import Price, PriceBook

T0 = datetime(2026, 3, 1, tzinfo=UTC)
MODELS = ["acme/small", "acme/large", "other/model"]

rates = st.decimals(min_value=0, max_value=200, places=6, allow_nan=False, allow_infinity=False)


@dataclass(frozen=True)
class Row:
    model: str
    at: datetime
    prompt: int
    completion: int
    cached: int
    priced_at_write: bool  # False: the price arrived after the row was written


@st.composite
def price_books(draw: st.DrawFn) -> PriceBook:
    versions = []
    version_id = 1
    for model in [*MODELS, "acme/*"]:
        for _ in range(draw(st.integers(0, 3))):
            start = T0 + timedelta(hours=draw(st.integers(-24, 24 * 30)))
            cached = draw(st.none() | rates)
            versions.append(
                Price(model, draw(rates), draw(rates), start, cached, version_id=version_id)
            )
            version_id += 1
    # (model, effective_from) is unique in the table.
    unique = {(p.model, p.effective_from): p for p in versions}
    return PriceBook(unique.values())


rows_strategy = st.lists(
    st.builds(
        Row,
        model=st.sampled_from(MODELS),
        at=st.integers(0, 24 * 30 - 1).map(lambda h: T0 + timedelta(hours=h)),
        prompt=st.integers(0, 200_000),
        completion=st.integers(0, 50_000),
        cached=st.integers(-5, 250_000),
        priced_at_write=st.booleans(),
    ),
    max_size=60,
)


def row_cost(row: Row, book: PriceBook) -> Decimal | None:
    price = book.price_for(row.model, row.at)
    return None if price is None else usage_cost(row_usage(row), price)


def row_usage(row: Row) -> TokenUsage:
    return TokenUsage(row.prompt, row.completion, row.cached)


def summed(rows: list[Row], book: PriceBook) -> list[UsageGroup]:
    """What the invoice query hands over: sums per model and version, stored cost or none."""
    groups: dict[tuple[str, Price | None, bool], tuple[UsageTotals, Decimal]] = {}
    for row in rows:
        price = book.price_for(row.model, row.at)
        stored = price is not None and row.priced_at_write
        cost = usage_cost(row_usage(row), price) if stored and price else Decimal(0)
        totals = UsageTotals(1, row.prompt, row.completion, countable_cached_tokens(row_usage(row)))
        key = (row.model, price, stored)
        previous, amount = groups.get(key, (UsageTotals(), Decimal(0)))
        groups[key] = (previous + totals, amount + cost)
    return [
        UsageGroup(LineKind.TOKENS, model, price, totals, amount if stored else None)
        for (model, price, stored), (totals, amount) in groups.items()
    ]


@settings(max_examples=150, deadline=None)
@given(price_books(), rows_strategy)
def test_lines_hold_exactly_the_rows_cost_and_the_total_is_their_rounded_sum(
    book: PriceBook, rows: list[Row]
) -> None:
    invoice = build_invoice(summed(rows, book))

    priced = [c for c in (row_cost(r, book) for r in rows) if c is not None]
    assert sum((line.amount_exact_usd for line in invoice.lines), Decimal(0)) == sum(
        priced, Decimal(0)
    )
    # Rounded once per line, half away from zero; the total is the sum of rounded lines,
    # not the rounding of the exact sum.
    for line in invoice.lines:
        assert line.amount_usd == round_cents(line.amount_exact_usd)
        assert line.amount_usd.as_tuple().exponent == -2
    assert invoice.total_usd == sum((line.amount_usd for line in invoice.lines), Decimal(0))
    assert abs(invoice.total_usd - invoice.total_exact_usd) <= Decimal("0.005") * len(invoice.lines)
    # One line per model and price version; quantities are the requests.
    keys = [(line.model, line.price_version_id) for line in invoice.lines]
    assert len(keys) == len(set(keys))
    unpriced_requests = sum(u.totals.requests for u in invoice.unpriced)
    assert sum(line.quantity for line in invoice.lines) + unpriced_requests == len(rows)
    assert invoice.finalizable == (unpriced_requests == 0)


@settings(max_examples=100, deadline=None)
@given(price_books(), rows_strategy, st.randoms(use_true_random=False))
def test_regenerating_from_the_same_ledger_gives_the_same_invoice(
    book: PriceBook, rows: list[Row], rnd: random.Random
) -> None:
    groups = summed(rows, book)
    shuffled = list(groups)
    rnd.shuffle(shuffled)
    assert build_invoice(shuffled) == build_invoice(groups)


@settings(max_examples=100, deadline=None)
@given(price_books(), rows_strategy, rates, rates)
def test_a_price_taking_effect_after_the_usage_changes_nothing(
    book: PriceBook, rows: list[Row], input_rate: Decimal, output_rate: Decimal
) -> None:
    before = build_invoice(summed(rows, book))
    later = T0 + timedelta(days=40)  # after every row
    new_versions = [Price(m, input_rate, output_rate, later, version_id=999) for m in MODELS]
    after = build_invoice(summed(rows, PriceBook([*book.versions(), *new_versions])))
    assert after == before


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 200_000), st.integers(0, 100_000), st.integers(-10, 300_000)),
        max_size=30,
    ),
    rates,
    rates,
    st.none() | rates,
)
def test_cost_of_summed_usage_equals_the_sum_of_the_rows_costs(
    rows: list[tuple[int, int, int]],
    input_rate: Decimal,
    output_rate: Decimal,
    cached_rate: Decimal | None,
) -> None:
    price = Price("m", input_rate, output_rate, T0, cached_rate)
    usages = [TokenUsage(p, c, k) for p, c, k in rows]
    totals = TokenUsage(
        sum(u.prompt_tokens for u in usages),
        sum(u.completion_tokens for u in usages),
        sum(countable_cached_tokens(u) for u in usages),
    )
    assert totals_cost(totals, price) == sum((usage_cost(u, price) for u in usages), Decimal(0))


def test_sub_cent_lines_round_half_away_from_zero_and_the_total_sums_rounded_lines() -> None:
    price = Price("m", Decimal("4"), Decimal("0"), T0, version_id=1)
    other = Price("n", Decimal("5"), Decimal("0"), T0, version_id=2)
    invoice = build_invoice(
        [
            # 1,000 prompt tokens at $4/M = $0.004, twice on two models: each line is $0.00.
            UsageGroup(LineKind.TOKENS, "m", price, UsageTotals(1, 1000, 0, 0), None),
            UsageGroup(LineKind.TOKENS, "n", other, UsageTotals(1, 1000, 0, 0), None),
        ]
    )
    assert [(line.amount_exact_usd, line.amount_usd) for line in invoice.lines] == [
        (Decimal("0.004"), Decimal("0.00")),
        (Decimal("0.005"), Decimal("0.01")),
    ]
    assert invoice.total_usd == Decimal("0.01")
    assert invoice.total_exact_usd == Decimal("0.009")


def test_quoted_tasks_bill_fixed_prices_and_failed_ones_follow_the_policy() -> None:
    price = Price("m", Decimal("1"), Decimal("2"), T0, version_id=1)
    failed_usage = (
        UsageGroup(LineKind.TOKENS, "m", price, UsageTotals(3, 1000, 500, 0), Decimal("0.002")),
    )
    fixed = TaskBilling.FIXED_PRICE
    succeeded = [
        QuotedTaskGroup("summarize", "m", TaskOutcome.SUCCEEDED, fixed, 2, Decimal("1.50")),
        QuotedTaskGroup("summarize", "m", TaskOutcome.SUCCEEDED, fixed, 1, Decimal("1.50")),
        QuotedTaskGroup("summarize", "m", TaskOutcome.SUCCEEDED, fixed, 1, Decimal("2.00")),
    ]
    free = build_invoice(
        [],
        [
            *succeeded,
            QuotedTaskGroup(
                "summarize", "m", TaskOutcome.FAILED, TaskBilling.FREE, 4, usage=failed_usage
            ),
        ],
    )
    assert [(line.quantity, line.unit_price_usd, line.amount_usd) for line in free.lines] == [
        (3, Decimal("1.50"), Decimal("4.50")),
        (1, Decimal("2.00"), Decimal("2.00")),
    ]
    assert free.total_usd == Decimal("6.50")

    failed = QuotedTaskGroup(
        "summarize", "m", TaskOutcome.FAILED, TaskBilling.COST, 4, usage=failed_usage
    )
    at_cost = build_invoice([], [*succeeded, failed])
    failed_line = [line for line in at_cost.lines if line.unit_price_usd is None]
    assert [(line.quantity, line.amount_exact_usd) for line in failed_line] == [
        (4, Decimal("0.002"))
    ]
    assert "failed summarize" in failed_line[0].description


def test_the_billing_of_a_task_is_decided_by_its_outcome_and_the_policies() -> None:
    cases = {
        (TaskOutcome.SUCCEEDED, FailedTaskPolicy.COST, ExpiredTaskPolicy.FREE): "fixed_price",
        (TaskOutcome.FAILED, FailedTaskPolicy.FREE, ExpiredTaskPolicy.COST): "free",
        (TaskOutcome.FAILED, FailedTaskPolicy.COST, ExpiredTaskPolicy.FREE): "cost",
        (TaskOutcome.EXPIRED, FailedTaskPolicy.COST, ExpiredTaskPolicy.FIXED_PRICE): "fixed_price",
        (TaskOutcome.EXPIRED, FailedTaskPolicy.FREE, ExpiredTaskPolicy.COST): "cost",
        (TaskOutcome.EXPIRED, FailedTaskPolicy.COST, ExpiredTaskPolicy.FREE): "free",
    }
    for (outcome, failed, expired), billing in cases.items():
        assert task_billing(outcome, failed, expired) == billing
    assert task_charge(TaskBilling.FIXED_PRICE, 3, Decimal("0.25"), Decimal(9)) == Decimal("0.75")
    assert task_charge(TaskBilling.COST, 3, Decimal("0.25"), Decimal("0.0123")) == Decimal("0.0123")
    assert task_charge(TaskBilling.FREE, 3, Decimal("0.25"), Decimal(9)) == 0


def test_late_tasks_are_labelled_with_their_month_and_late_rows_with_their_tasks() -> None:
    price = Price("m", Decimal("1"), Decimal("1"), T0, version_id=7)
    rows = (UsageGroup(LineKind.TOKENS, "m", price, UsageTotals(2, 20, 0, 0), Decimal("0.00002")),)
    invoice = build_invoice(
        [],
        [
            QuotedTaskGroup(
                "summarize",
                "m",
                TaskOutcome.EXPIRED,
                TaskBilling.FIXED_PRICE,
                1,
                Decimal("0.50"),
                period="2026-02",
            ),
            QuotedTaskGroup(
                "summarize",
                "m",
                TaskOutcome.FAILED,
                TaskBilling.COST,
                0,
                usage=rows,
                period="2026-01",
                late_rows=True,
            ),
        ],
    )
    assert [(x.kind, x.period, x.quantity, x.amount_exact_usd) for x in invoice.lines] == [
        (LineKind.LATE_TASK, "2026-01", 2, Decimal("0.00002")),
        (LineKind.LATE_TASK, "2026-02", 1, Decimal("0.50")),
    ]
    assert invoice.lines[1].description.startswith("Late from 2026-02: 1 x summarize")
    assert "expired open" in invoice.lines[1].description
    assert "recorded after they were billed" in invoice.lines[0].description


def test_late_usage_lines_are_labelled_with_their_period() -> None:
    price = Price("m", Decimal("1"), Decimal("1"), T0, version_id=7)
    invoice = build_invoice(
        [
            UsageGroup(LineKind.TOKENS, "m", price, UsageTotals(1, 10, 0, 0), Decimal("0.00001")),
            UsageGroup(
                LineKind.LATE_USAGE,
                "m",
                price,
                UsageTotals(2, 20, 0, 0),
                Decimal("0.00002"),
                period="2026-02",
            ),
        ]
    )
    assert [(line.kind, line.period) for line in invoice.lines] == [
        (LineKind.TOKENS, None),
        (LineKind.LATE_USAGE, "2026-02"),
    ]
    assert invoice.lines[1].description.startswith("Late usage from 2026-02")


def test_billing_periods() -> None:
    period = BillingPeriod.parse("2026-12")
    assert (period.start, period.end) == (
        datetime(2026, 12, 1, tzinfo=UTC),
        datetime(2027, 1, 1, tzinfo=UTC),
    )
    assert str(period.next()) == "2027-01"
    assert BillingPeriod.of(datetime(2026, 12, 31, 23, 59, tzinfo=UTC)) == period
    # 9999-12 ends in year 10000, which no datetime holds; nothing is billed before 1970.
    bad_months = ("2026-13", "2026-1", "26-01", "2026-00", "", "9999-12", "1969-12", "0000-01")
    for bad in (*bad_months, "2026-01\n", " 2026-01"):
        with pytest.raises(ValueError):
            BillingPeriod.parse(bad)
    with pytest.raises(ValueError, match="no zone"):
        BillingPeriod.of(datetime(2026, 12, 31, 23, 59))  # whose midnight would it be?
    with pytest.raises(AttributeError):
        period.month = 1


@given(st.integers(1970 * 12, 9999 * 12 + 10), st.integers(-2400, 2400))
def test_billing_periods_are_months_in_order(index: int, months: int) -> None:
    period = BillingPeriod(index // 12, index % 12 + 1)
    assert BillingPeriod.parse(str(period)) == period
    assert hash(BillingPeriod.parse(str(period))) == hash(period)
    assert period.shifted(months).shifted(-months) == period
    assert period.next().previous() == period == period.previous().next()
    assert period < period.next() and not period < period
    assert (period < period.shifted(months)) == (months > 0)
    assert (
        BillingPeriod.of(period.start)
        == period
        == BillingPeriod.of(period.end - timedelta.resolution)
    )


# -- the late-usage rule ---------------------------------------------------------------------

instants = st.integers(0, 1000).map(lambda s: T0 + timedelta(seconds=s))


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.none() | instants, instants), max_size=6),
    instants,
    st.lists(instants, max_size=40),
)
def test_uncovered_windows_are_exactly_what_no_billed_window_holds(
    billed_pairs: list[tuple[datetime | None, datetime]],
    cutoff: datetime,
    probes: list[datetime],
) -> None:
    billed = [BilledWindow(a, u) for a, u in billed_pairs]
    free = uncovered_windows(cutoff, billed)
    for at in [*probes, cutoff, *(w.until for w in billed)]:
        in_billed = any(w.contains(at) for w in billed)
        holders = [w for w in free if w.contains(at)]
        assert len(holders) <= 1
        assert bool(holders) == (at <= cutoff and not in_billed)
    assert all(w.after is None or w.after < w.until for w in free)


@dataclass
class SimInvoice:
    period: int
    status: str  # draft | finalized | void
    windows: list[tuple[int, BilledWindow]]  # (usage period, window)
    rows: list[int]  # ids of the rows it bills


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_every_row_of_a_closed_month_is_billed_by_exactly_one_finalized_invoice(
    data: st.DataObject,
) -> None:
    """A random history of rows arriving (some late), invoices finalized in any order and
    voided, with the rule of `pricing.invoice`: no row is ever billed twice, and once every
    month has a finalized invoice and a later one is finalized, no row is left unbilled."""
    months = 4
    rows: list[tuple[int, int]] = []  # (usage period, recorded at)
    invoices: list[SimInvoice] = []
    clock = 0

    def billed_windows(period: int) -> list[BilledWindow]:
        return [
            w
            for inv in invoices
            if inv.status == "finalized"
            for p, w in inv.windows
            if p == period
        ]

    def finalize(period: int) -> None:
        cutoff = T0 + timedelta(seconds=clock)
        live = [i for i in invoices if i.period == period and i.status != "void"]
        if live and live[0].status == "finalized":
            return
        closed = {i.period for i in invoices if i.status == "finalized"}
        windows = [(period, w) for w in uncovered_windows(cutoff, billed_windows(period))]
        for earlier in sorted(p for p in closed if p < period):
            windows += [(earlier, w) for w in uncovered_windows(cutoff, billed_windows(earlier))]
        billed_rows = [
            i
            for i, (p, t) in enumerate(rows)
            if any(p == wp and w.contains(T0 + timedelta(seconds=t)) for wp, w in windows)
        ]
        if live:
            invoices.remove(live[0])
        invoices.append(SimInvoice(period, "finalized", windows, billed_rows))

    for _ in range(data.draw(st.integers(1, 40))):
        clock += 1
        action = data.draw(st.sampled_from(["row", "row", "row", "finalize", "void"]))
        if action == "row":
            rows.append((data.draw(st.integers(0, months - 1)), clock))
        elif action == "finalize":
            finalize(data.draw(st.integers(0, months - 1)))
        else:
            finalized = [i for i in invoices if i.status == "finalized"]
            if finalized:
                data.draw(st.sampled_from(finalized)).status = "void"
        counts = [0] * len(rows)
        for inv in invoices:
            if inv.status == "finalized":
                for r in inv.rows:
                    counts[r] += 1
        assert max(counts, default=0) <= 1, "a row was billed twice"

    # Close every month, then one more invoice after all of them picks up what is late.
    for period in range(months):
        clock += 1
        finalize(period)
    clock += 1
    finalize(months)
    counts = [0] * len(rows)
    for inv in invoices:
        if inv.status == "finalized":
            for r in inv.rows:
                counts[r] += 1
    assert counts == [1] * len(rows)
