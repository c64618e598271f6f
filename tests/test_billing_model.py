"""A model of the whole billing lifecycle, checked against an oracle of its own.

Hypothesis drives a state machine through the operations the server runs, in process, on
a real Postgres built by the migrations: requests priced as the proxy prices them (and
admitted or refused by the proxy's task guard), some written at once by the ledger
writer's insert path and some held back and written later (a spool replayed after the
month's rollup, draft or invoice), adjustments, backdated prices, quotes accepted,
tasks completed (succeeded, failed, backdated into a month already invoiced) or expired,
policy changes, rollups, drafts, finalizations and voids, on a clock of its own (every
operation is given its instant; nothing sleeps).

The oracle is plain Python over Decimal: it keeps every ledger row, price version, task and
invoice, decides which invoice bills each row and task by the documented rules, and
predicts each draft's and finalized invoice's lines. After every draft and finalization
the invoice must hold exactly the predicted lines (so each row is billed once, in the right
month, at the price in force at its `occurred_at`), each line rounded once, the total the
sum of the rounded lines. At the end of every run each month is closed, and every row and
task must have been billed exactly once.

`METERLINE_MODEL_EXAMPLES` (default 15) and `METERLINE_MODEL_STEPS` (default 30) bound the
run; it prints how many examples and steps ran.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal, localcontext
from functools import partial
from typing import Any, TypeVar, cast

import asyncpg
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule, run_state_machine_as_test
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from pricing.cost import TokenUsage, usage_cost
from pricing.invoice import BillingPeriod
from pricing.prices import PriceBook
from service.accounts.schemas import AccountCreate, AccountUpdate
from service.accounts.service import create_account, update_account
from service.auth.principal import Principal
from service.db.engine import asyncpg_dsn, create_engine, session_factory, transaction
from service.errors import MeterlineError
from service.invoices import service as invoices
from service.invoices.repository.rollup import RollupRepository
from service.ledger.record import BatchSource, LedgerKind, LedgerRecord, months_of, new_request_id
from service.ledger.repository import LedgerRepository
from service.prices.repository import PriceRepository
from service.prices.schemas import PriceCreate
from service.prices.service import add_price
from service.proxy.context import RequestContext
from service.quotes.schemas import QuoteAccept, QuoteCreate
from service.quotes.service import accept_quote, create_quote
from service.settings import Settings
from service.tasks import service as tasks
from service.tasks.expiry import expire_tasks
from service.tasks.guard import TaskClosed, TaskCostCapReached, TaskGuard, TaskModelMismatch
from service.tasks.schemas import Outcome

EXAMPLES = int(os.environ.get("METERLINE_MODEL_EXAMPLES", "15"))
STEPS = int(os.environ.get("METERLINE_MODEL_STEPS", "30"))

ADMIN = Principal(account_id=None, key_id=None)
START = datetime(2025, 1, 1, tzinfo=UTC)
EXPIRY = timedelta(days=5)
CENT = Decimal("0.01")
NO_CONTEXT = cast(RequestContext, None)  # the guard's `settle` reads only the record
TASK_IDS = ("j0", "j1", "j2", "j3")
T = TypeVar("T")


def month(at: datetime) -> str:
    return f"{at.year:04d}-{at.month:02d}"


def rounded(amount: Decimal) -> Decimal:
    """To the cent, half away from zero (Decimal's ROUND_HALF_UP rounds magnitudes)."""
    return amount.quantize(CENT, rounding=ROUND_HALF_UP)


# -- the oracle's records ------------------------------------------------------------------


@dataclass
class Row:
    request_id: str
    account: uuid.UUID
    occurred_at: datetime
    kind: str  # usage | adjustment
    model: str
    prompt: int
    completion: int
    cached: int
    cost: Decimal | None  # as stored: None when no price covered it when it was written
    version: int | None
    task_id: str | None
    seq: int | None = None  # order of insertion; None while it waits in the spool
    billed_by: uuid.UUID | None = None  # the finalized invoice billing it on its own
    # A row stored unpriced is billed at what its finalized invoice priced it: a version
    # added afterwards changes neither (until that invoice is voided).
    billed_at: tuple[Decimal, int | None] | None = None

    @property
    def period(self) -> str:
        return month(self.occurred_at)


@dataclass(frozen=True)
class Version:
    id: int
    model: str
    input: Decimal
    output: Decimal
    cached: Decimal | None
    effective_from: datetime


@dataclass
class Task:
    account: uuid.UUID
    external_id: str
    quoted: bool
    model: str | None
    task_type: str | None
    fixed_price: Decimal | None
    cap: Decimal | None
    created_at: datetime
    expires_at: datetime | None
    status: str = "open"
    completed_at: datetime | None = None
    billed_as: str | None = None
    billed_by: uuid.UUID | None = None
    billed_rows_until: int | None = None  # seq of the first finalized invoice's cutoff
    guard_cost: Decimal = Decimal(0)  # what the proxy's guard has seen it cost

    @property
    def period(self) -> str:
        assert self.completed_at is not None
        return month(self.completed_at)


@dataclass
class Invoice:
    id: uuid.UUID
    account: uuid.UUID
    period: str
    status: str = "finalized"


@dataclass
class Policy:
    failed: str = "free"
    expired: str = "fixed_price"


# A line as the invoice stores it: kind, period label, model, price version, task type,
# unit price, exact amount.
Line = tuple[str, str | None, str | None, int | None, str | None, Decimal | None, Decimal]


@dataclass
class Expected:
    lines: list[Line]
    unpriced: int  # rows it would bill that no price covers
    rows: list[Row] = field(default_factory=list)
    tasks: list[Task] = field(default_factory=list)


class Oracle:
    """The documented rules, written out again over plain records."""

    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.versions: list[Version] = []
        self.tasks: dict[tuple[uuid.UUID, str], Task] = {}
        self.invoices: list[Invoice] = []
        self.policies: dict[uuid.UUID, Policy] = {}
        self.seq = 0

    # prices -------------------------------------------------------------------------

    def price(self, model: str, at: datetime) -> Version | None:
        live = [v for v in self.versions if v.model == model and v.effective_from <= at]
        return max(live, key=lambda v: v.effective_from) if live else None

    @staticmethod
    def cost(v: Version, prompt: int, completion: int, cached: int) -> Decimal:
        with localcontext() as ctx:
            ctx.prec = 60
            countable = min(max(cached, 0), prompt) if v.cached is not None else 0
            micro = (
                (prompt - countable) * v.input
                + countable * (v.cached or Decimal(0))
                + completion * v.output
            )
            return micro / Decimal(1_000_000)

    # tasks --------------------------------------------------------------------------

    def covering(self, row: Row) -> Task | None:
        if row.task_id is None or row.kind != "usage":
            return None
        task = self.tasks.get((row.account, row.task_id))
        if task is None or not task.quoted or row.occurred_at < task.created_at:
            return None
        return task

    def billing(self, account: uuid.UUID, outcome: str) -> str:
        policy = self.policies[account]
        if outcome == "succeeded":
            return "fixed_price"
        return policy.failed if outcome == "failed" else policy.expired

    def expire(self, account: uuid.UUID, now: datetime, only: Task | None = None) -> None:
        for task in self.tasks.values():
            if only is not None and task is not only:
                continue
            due = task.expires_at is not None and task.expires_at <= now
            if task.account == account and task.quoted and task.status == "open" and due:
                task.status, task.completed_at = "expired", task.expires_at
                task.billed_as = self.billing(account, "expired")

    # invoices -----------------------------------------------------------------------

    def closed(self, account: uuid.UUID) -> set[str]:
        return {i.period for i in self.invoices if i.account == account and i.status == "finalized"}

    def live(self, account: uuid.UUID, period: str) -> Invoice | None:
        found = [
            i
            for i in self.invoices
            if i.account == account and i.period == period and i.status == "finalized"
        ]
        return found[0] if found else None

    def row_cost(self, row: Row) -> tuple[Decimal, int | None] | None:
        """What the row is billed and the version pricing it; None when unpriced still."""
        if row.cost is not None:
            return row.cost, row.version
        if row.billed_at is not None:
            return row.billed_at
        version = self.price(row.model, row.occurred_at)
        if version is None:
            return None
        return self.cost(version, row.prompt, row.completion, row.cached), version.id

    def expected(self, account: uuid.UUID, period: str) -> Expected:
        closed = self.closed(account)

        def label(of: str) -> str | bool | None:
            """None for the invoice's own month, the month for a finalized earlier one,
            False for a month this invoice does not bill."""
            if of == period:
                return None
            return of if of < period and of in closed else False

        amounts: dict[tuple[Any, ...], Decimal] = {}
        unpriced = 0
        billed_rows: list[Row] = []
        for row in self.rows:
            if row.account != account or row.seq is None or row.billed_by is not None:
                continue
            task = self.covering(row)
            late_task_row = (
                task is not None
                and task.billed_as == "cost"
                and task.billed_rows_until is not None
                and row.seq > task.billed_rows_until
            )
            if task is not None and not late_task_row:
                continue
            usage_label = label(row.period)
            if usage_label is False:
                continue
            priced = self.row_cost(row)
            if priced is None:
                unpriced += 1
                continue
            cost, version = priced
            billed_rows.append(row)
            if task is None:
                kind = "late_usage" if usage_label else row.kind.replace("usage", "tokens")
                key: tuple[Any, ...] = (kind, usage_label, row.model, version, None, None)
            else:
                task_label = None if task.period == period else task.period
                kind = "task" if task_label is None else "late_task"
                key = (kind, task_label, task.model, None, task.task_type, None, "late rows")
                key += (task.status,)
            amounts[key] = amounts.get(key, Decimal(0)) + cost
        billed_tasks: list[Task] = []
        for task in self.tasks.values():
            if task.account != account or not task.quoted or task.status == "open":
                continue
            if task.billed_by is not None:
                continue
            of_task = label(task.period)
            if of_task is False:
                continue
            task_label = cast(str | None, of_task)
            billed_tasks.append(task)
            kind = "task" if task_label is None else "late_task"
            if task.billed_as == "fixed_price":
                assert task.fixed_price is not None
                key = (kind, task_label, task.model, None, task.task_type, task.fixed_price)
                key += ("fixed", task.status)
                amounts[key] = amounts.get(key, Decimal(0)) + task.fixed_price
            elif task.billed_as == "cost":
                key = (kind, task_label, task.model, None, task.task_type, None, "cost")
                key += (task.status,)
                total = amounts.get(key, Decimal(0))
                for row in self.rows:
                    if row.seq is None or self.covering(row) is not task:
                        continue
                    if task.billed_rows_until is not None and row.seq > task.billed_rows_until:
                        continue
                    priced = self.row_cost(row)
                    if priced is None:
                        unpriced += 1
                    else:
                        total += priced[0]
                amounts[key] = total
        lines: list[Line] = [
            (k[0], k[1], k[2], k[3], k[4], k[5], amount) for k, amount in amounts.items()
        ]
        return Expected(line_set(lines), unpriced, billed_rows, billed_tasks)

    def finalized(self, invoice: Invoice, expected: Expected) -> None:
        self.invoices.append(invoice)
        for row in expected.rows:
            row.billed_by = invoice.id
            if row.cost is None:
                row.billed_at = self.row_cost(row)
        for task in expected.tasks:
            task.billed_by = invoice.id
            if task.billed_rows_until is None:
                task.billed_rows_until = self.seq

    def voided(self, invoice: Invoice) -> None:
        invoice.status = "void"
        for row in self.rows:
            if row.billed_by == invoice.id:
                row.billed_by = None
                row.billed_at = None
        for task in self.tasks.values():
            if task.billed_by == invoice.id:
                task.billed_by = None


def _normal(line: Line) -> Line:
    """Decimals written one way (0.010 and 0.01 are one amount)."""
    kind, period, model, version, task_type, unit, amount = line
    return (
        kind,
        period,
        model,
        version,
        task_type,
        None if unit is None else unit.normalize(),
        amount.normalize(),
    )


def _line_order(line: Line) -> tuple[Any, ...]:
    return tuple("" if v is None else str(v) for v in line)


def line_set(lines: list[Line]) -> list[Line]:
    return sorted((_normal(x) for x in lines), key=_line_order)


# -- the machine ---------------------------------------------------------------------------


@dataclass
class Figures:
    examples: int = 0
    steps: int = 0
    rows: int = 0
    finalized: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    closing: float = 0.0

    def count(self, what: str) -> None:
        self.refused[what] = self.refused.get(what, 0) + 1


@dataclass
class World:
    """What the runs share: one event loop, one engine on the test's own database."""

    loop: asyncio.AbstractEventLoop
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    connection: asyncpg.Connection
    settings: Settings
    figures: Figures

    def run(self, work: Awaitable[T]) -> T:
        return self.loop.run_until_complete(work)

    def unit(self, work: Callable[[AsyncSession], Awaitable[T]]) -> T:
        """One transaction, committed on success and rolled back on error, as the API's."""

        async def run() -> T:
            async with transaction(self.sessions) as session:
                return await work(session)

        return self.run(run())


WORLD: World | None = None

# A request: account, on the model priced later, task id, prompt, completion and cached
# tokens, held in the spool.
Request = tuple[int, bool, str | None, int, int, int, bool]
REQUESTS = st.tuples(
    st.integers(0, 1),
    st.booleans(),
    st.sampled_from((None, *TASK_IDS)),
    st.integers(1, 3000),
    st.integers(0, 2000),
    st.integers(0, 400),
    st.booleans(),
)
GAPS = (timedelta(seconds=1), timedelta(minutes=30), timedelta(hours=9))
WAITS = (timedelta(minutes=10), timedelta(hours=7), timedelta(days=2), timedelta(days=6), None)
amounts = st.sampled_from(["-0.40", "-0.25", "50.00", "0.013", "-0.005", "1.115", "0.004"])
rates = st.sampled_from(["0.5", "1.25", "3", "7.5", "12"])


class BillingLifecycle(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        assert WORLD is not None
        self.world = WORLD
        self.world.figures.examples += 1
        self.oracle = Oracle()
        self.now = START + timedelta(hours=1)
        self.guard = TaskGuard(None)
        self.book: PriceBook | None = None
        self.ledger = LedgerRepository()
        self.spool: list[tuple[Row, LedgerRecord]] = []
        self.accounts: list[uuid.UUID] = []
        self.offset = 0  # microseconds that keep price instants apart
        tag = uuid.uuid4().hex[:8]
        self.priced = f"model-{tag}/chat"
        self.later = f"model-{tag}/later"  # no price until a backdated one is added

    # helpers --------------------------------------------------------------------------

    def step(self) -> None:
        self.world.figures.steps += 1

    def add_version(self, model: str, effective_from: datetime, rate: str, cached: bool) -> None:
        self.offset += 1
        at = effective_from + timedelta(microseconds=self.offset)
        data = PriceCreate(
            model=model,
            input_usd_per_mtok=Decimal(rate),
            output_usd_per_mtok=Decimal(rate) * 3,
            cached_input_usd_per_mtok=Decimal(rate) / 4 if cached else None,
            effective_from=at,
        )
        version, new = self.world.unit(lambda s: add_price(s, data))
        assert new
        self.oracle.versions.append(
            Version(
                version.id,
                model,
                data.input_usd_per_mtok,
                data.output_usd_per_mtok,
                data.cached_input_usd_per_mtok,
                at,
            )
        )
        self.book = None  # the proxy's book reloads (the serving process at once)

    def price_book(self) -> PriceBook:
        if self.book is None:
            self.book = PriceBook(self.world.unit(lambda s: PriceRepository(s).all_prices()))
        return self.book

    def write(self, entries: list[tuple[Row, LedgerRecord]]) -> None:
        """Through the ledger writer's insert path, in one batch, as the writer or a replay."""
        if not entries:
            return
        lines = [record.to_json() for _, record in entries]
        stored = self.world.run(
            self.ledger.store(self.world.connection, lines, months_of(lines), BatchSource.LIVE)
        )
        assert (stored.inserted, stored.quarantined) == (len(entries), 0)
        for row, _ in entries:
            self.oracle.seq += 1
            row.seq = self.oracle.seq
            self.oracle.rows.append(row)
        self.world.figures.rows += len(entries)

    def record(self, row: Row) -> LedgerRecord:
        return LedgerRecord(
            request_id=row.request_id,
            occurred_at=row.occurred_at,
            account_id=row.account,
            key_id=None,
            task_id=row.task_id,
            task_type=None,
            endpoint="chat",
            requested_model=row.model,
            upstream_model=row.model if row.kind == "usage" else None,
            provider="mock" if row.kind == "usage" else None,
            stream=False,
            status_code=200,
            error_code=None,
            prompt_tokens=row.prompt,
            completion_tokens=row.completion,
            total_tokens=row.prompt + row.completion,
            cached_tokens=row.cached,
            reasoning_tokens=0,
            usage_source="upstream" if row.kind == "usage" else "none",
            latency_ms=1 if row.kind == "usage" else None,
            ttft_ms=None,
            cost_usd=row.cost,
            price_version_id=row.version,
            kind=LedgerKind(row.kind),
        )

    def check_invoice(self, invoice_id: uuid.UUID, expected: Expected) -> Any:
        invoice = self.world.unit(lambda s: invoices.get(s, invoice_id))
        lines: list[Line] = []
        for line in invoice.lines:
            # Each line rounded once, half away from zero.
            assert line.amount_usd == rounded(line.amount_exact_usd), line.description
            lines.append(
                (
                    line.kind,
                    line.period,
                    line.model,
                    line.price_version_id,
                    line.task_type,
                    line.unit_price_usd,
                    line.amount_exact_usd,
                )
            )
        assert invoice.total_usd == sum((x.amount_usd for x in invoice.lines), Decimal("0.00"))
        assert line_set(lines) == expected.lines, f"{invoice.period} {invoice.status}"
        assert invoice.total_usd == sum((rounded(x[-1]) for x in expected.lines), Decimal(0))
        unpriced = sum(int(str(u["requests"])) for u in invoice.unpriced_usage or [])
        assert unpriced == expected.unpriced
        return invoice

    def periods(self) -> list[BillingPeriod]:
        """Every month from the first to the current one."""
        first, last = BillingPeriod.of(START), BillingPeriod.of(self.now)
        months = [first]
        while months[-1] < last:
            months.append(months[-1].next())
        return months

    # setting up -------------------------------------------------------------------------

    @initialize(
        policies=st.lists(
            st.tuples(
                st.sampled_from(["free", "cost"]),
                st.sampled_from(["fixed_price", "cost", "free"]),
            ),
            min_size=2,
            max_size=2,
        ),
        first=st.lists(REQUESTS, min_size=1, max_size=6),
    )
    def setup(self, policies: list[tuple[str, str]], first: list[Request]) -> None:
        for failed, expired in policies:
            data = AccountCreate.model_validate(
                {"name": "model", "failed_task_policy": failed, "expired_task_policy": expired}
            )
            account = self.world.unit(partial(_create, data=data))
            self.accounts.append(account.id)
            self.oracle.policies[account.id] = Policy(failed, expired)
        self.add_version(self.priced, START - timedelta(days=30), "2", cached=True)
        for request in first:
            self.request(*request)
            self.now += timedelta(hours=5)

    # the clock ----------------------------------------------------------------------------

    @rule(
        wait=st.sampled_from(WAITS),
        requests=st.lists(REQUESTS, min_size=0, max_size=4),
        gap=st.sampled_from(GAPS),
        adjust=st.none() | amounts,
    )
    def traffic(
        self, wait: timedelta | None, requests: list[Request], gap: timedelta, adjust: str | None
    ) -> None:
        """Time passes (`None`: to a minute before the month ends, so what follows straddles
        it), then a few proxied requests, `gap` apart, and maybe an adjustment."""
        self.step()
        if adjust is not None:
            self.adjust(0, adjust, 0)
        if wait is None:
            self.now = max(self.now, BillingPeriod.of(self.now).end - timedelta(minutes=1))
        else:
            self.now += wait
        for i, request in enumerate(requests):
            if i:
                self.now += gap
            self.request(*request)

    @rule(
        which=st.integers(0, 1),
        task=st.sampled_from(TASK_IDS),
        steps=st.lists(REQUESTS, min_size=1, max_size=3),
        gap=st.sampled_from(GAPS),
    )
    def agent_steps(self, which: int, task: str, steps: list[Request], gap: timedelta) -> None:
        """Requests of one account under one task id (an agent's loop)."""
        self.step()
        for i, (_, later_model, _, prompt, completion, cached, spooled) in enumerate(steps):
            if i:
                self.now += gap
            self.request(which, later_model, task, prompt, completion, cached, spooled)

    def request(
        self,
        which: int,
        later_model: bool,
        task: str | None,
        prompt: int,
        completion: int,
        cached: int,
        spooled: bool,
    ) -> None:
        """A proxied request: admitted or refused by the task guard, priced by the version
        in force at its instant, written now or held in the spool."""
        account = self.accounts[which]
        model = self.later if later_model else self.priced
        known = self.oracle.tasks.get((account, task)) if task else None
        refusal: type[MeterlineError] | None = None
        if known is not None and known.status != "open":
            refusal = TaskClosed
        elif known is not None and known.quoted and self.now >= known.created_at:
            assert known.expires_at is not None and known.cap is not None
            if self.now >= known.expires_at:
                refusal = TaskClosed
            elif model != known.model:
                refusal = TaskModelMismatch
            elif known.guard_cost >= known.cap:
                refusal = TaskCostCapReached
        try:
            self.guard.check(account, task, model, self.now)
        except (TaskClosed, TaskModelMismatch, TaskCostCapReached) as refused:
            assert refusal is not None and isinstance(refused, refusal), refused
            self.world.figures.count(refused.code)
            return
        assert refusal is None, f"the guard admitted a request it must refuse ({refusal})"
        price = self.price_book().price_for(model, self.now)
        version = self.oracle.price(model, self.now)
        assert (price.version_id if price else None) == (version.id if version else None)
        cost = None
        if price is not None:
            cost = usage_cost(TokenUsage(prompt, completion, cached), price)
            assert version is not None
            assert cost == self.oracle.cost(version, prompt, completion, cached)
        row = Row(
            new_request_id(),
            account,
            self.now,
            "usage",
            model,
            prompt,
            completion,
            cached,
            cost,
            price.version_id if price else None,
            task,
        )
        record = self.record(row)
        self.world.run(self.guard.settle(NO_CONTEXT, record))
        if known is not None and known.quoted and self.now >= known.created_at and cost:
            known.guard_cost += cost
        if spooled:
            self.spool.append((row, record))
        else:
            self.write([(row, record)])

    @rule(count=st.integers(1, 5))
    def replay_the_spool(self, count: int) -> None:
        """Rows held back (Postgres was down) reach the ledger, whatever month they are of."""
        self.step()
        replayed, self.spool = self.spool[:count], self.spool[count:]
        self.write(replayed)

    @rule(which=st.integers(0, 1), amount=amounts, days_back=st.sampled_from([0, 0, 25, 45]))
    def adjustment(self, which: int, amount: str, days_back: int) -> None:
        self.step()
        self.adjust(which, amount, days_back)

    def adjust(self, which: int, amount: str, days_back: int) -> None:
        at = max(START, self.now - timedelta(days=days_back))
        row = Row(
            "adj_" + new_request_id().removeprefix("req_"),
            self.accounts[which],
            at,
            "adjustment",
            self.priced,
            0,
            0,
            0,
            Decimal(amount),
            None,
            None,
        )
        self.write([(row, self.record(row))])

    @rule(
        later_model=st.booleans(),
        days_back=st.sampled_from([0, 3, 20, 50, 90]),
        rate=rates,
        cached=st.booleans(),
    )
    def backdated_price(self, later_model: bool, days_back: int, rate: str, cached: bool) -> None:
        """A new version, maybe dated in a month already invoiced: it prices the rows stored
        without a price (on the next draft) and the requests to come, never a stored row."""
        self.step()
        model = self.later if later_model else self.priced
        self.add_version(model, self.now - timedelta(days=days_back), rate, cached)

    @rule(
        which=st.integers(0, 1),
        failed=st.sampled_from(["free", "cost"]),
        expired=st.sampled_from(["fixed_price", "cost", "free"]),
    )
    def change_policy(self, which: int, failed: str, expired: str) -> None:
        self.step()
        account = self.accounts[which]
        data = AccountUpdate.model_validate(
            {"failed_task_policy": failed, "expired_task_policy": expired}
        )
        self.world.unit(lambda s: update_account(s, ADMIN, account, data))
        self.oracle.policies[account] = Policy(failed, expired)

    # tasks ------------------------------------------------------------------------------

    @rule(which=st.integers(0, 1), task=st.sampled_from(TASK_IDS))
    def accept_a_quote(self, which: int, task: str) -> None:
        self.step()
        account = self.accounts[which]
        in_use = (account, task) in self.oracle.tasks or any(
            r.account == account and r.task_id == task and r.seq is not None
            for r in self.oracle.rows
        )
        request = QuoteCreate(
            account_id=account,
            task_type="summarize",
            model=self.priced,
            prompt_tokens=1000,
            max_completion_tokens=1000,
        )
        now = self.now
        book = self.price_book()

        async def accept(session: AsyncSession) -> Any:
            quote = await create_quote(session, self.world.settings, book, ADMIN, request, now)
            return await accept_quote(
                session,
                self.world.settings,
                self.guard,
                ADMIN,
                quote.id,
                QuoteAccept(task_id=task),
                now,
            )

        try:
            opened = self.world.unit(accept)
        except tasks.TaskIdInUse:
            assert in_use
            self.world.figures.count("task_id_in_use")
            return
        assert not in_use
        assert opened.created_at == now and opened.expires_at == now + EXPIRY
        self.oracle.tasks[(account, task)] = Task(
            account,
            task,
            True,
            self.priced,
            "summarize",
            opened.fixed_price_usd,
            opened.cost_cap_usd,
            now,
            now + EXPIRY,
        )

    @rule(
        which=st.integers(0, 1),
        task=st.sampled_from(TASK_IDS),
        outcome=st.sampled_from(["succeeded", "failed"]),
        back=st.sampled_from([timedelta(0), timedelta(0), timedelta(hours=2), timedelta(days=3)]),
    )
    def complete(self, which: int, task: str, outcome: str, back: timedelta) -> None:
        """The admin reports an outcome, dated `back` before now (a completion committed
        late, possibly into a month already invoiced)."""
        self.step()
        account = self.accounts[which]
        known = self.oracle.tasks.get((account, task))
        at = self.now - back
        if known is not None:
            at = max(at, known.created_at)
        seen = any(
            r.account == account and r.task_id == task and r.seq is not None
            for r in self.oracle.rows
        )

        async def report(session: AsyncSession) -> Any:
            return await tasks.complete_task(
                session, self.guard, ADMIN, task, account, cast(Outcome, outcome), at
            )

        try:
            done = self.world.unit(report)
        except tasks.TaskAlreadyCompleted:
            assert known is not None
            past_deadline = known.expires_at is not None and at >= known.expires_at
            assert known.status != "open" or past_deadline
            self.world.figures.count("task_already_completed")
            return
        except MeterlineError as error:
            assert error.status_code == 404 and known is None and not seen, error
            self.world.figures.count("task_not_found")
            return
        if known is None:
            assert seen
            known = Task(account, task, False, None, None, None, None, at, None)
            self.oracle.tasks[(account, task)] = known
        assert known.status == "open"
        known.status, known.completed_at = outcome, at
        known.billed_as = self.oracle.billing(account, outcome) if known.quoted else None
        assert done.billed_as == known.billed_as

    @rule(roll_up=st.booleans(), expire=st.booleans())
    def background_jobs(self, roll_up: bool, expire: bool) -> None:
        """The rollup folds the rows recorded so far; the expiry job closes tasks past
        their deadline."""
        self.step()
        if roll_up:
            self.world.unit(lambda s: RollupRepository(s).roll_up())
        if expire:
            self.world.unit(lambda s: expire_tasks(s, self.now, self.accounts))
            for account in self.accounts:
                self.oracle.expire(account, self.now)

    # invoices ---------------------------------------------------------------------------

    def draft(
        self, account: uuid.UUID, period: BillingPeriod, check: bool = True
    ) -> uuid.UUID | None:
        """Generate the month's draft and check it; None when it is finalized."""
        now = self.now
        result = self.world.unit(lambda s: invoices.generate(s, period, [account], now=now))
        self.oracle.expire(account, now)
        if account in result.finalized:
            assert self.oracle.live(account, str(period)) is not None
            return None
        assert self.oracle.live(account, str(period)) is None
        invoice_id = result.invoice_ids[account]
        if check:
            self.check_invoice(invoice_id, self.oracle.expected(account, str(period)))
        return invoice_id

    def maybe_roll_up(self, roll_up: bool) -> None:
        if roll_up:
            self.world.unit(lambda s: RollupRepository(s).roll_up())

    @rule(which=st.integers(0, 1), back=st.integers(0, 3), roll_up=st.booleans())
    def generate_a_draft(self, which: int, back: int, roll_up: bool) -> None:
        self.step()
        self.maybe_roll_up(roll_up)
        months = self.periods()
        self.draft(self.accounts[which], months[max(0, len(months) - 1 - back)])

    def finalize_month(
        self, account: uuid.UUID, period: BillingPeriod, check_draft: bool = True
    ) -> None:
        invoice_id = self.draft(account, period, check_draft)
        if invoice_id is None:
            return
        now = self.now
        # What finalizing will bill: tasks past their deadline expire first.
        self.oracle.expire(account, now)
        expected = self.oracle.expected(account, str(period))
        try:
            self.world.unit(lambda s: invoices.finalize(s, invoice_id, now=now, wait_s=0))
        except invoices.PeriodNotOver:
            assert now < period.end
            self.world.figures.count("period_not_over")
            return
        except invoices.UsageWithoutPrice:
            assert now >= period.end and expected.unpriced > 0
            self.world.figures.count("unpriced_usage")
            return
        assert now >= period.end and expected.unpriced == 0
        self.check_invoice(invoice_id, expected)
        self.oracle.finalized(Invoice(invoice_id, account, str(period)), expected)
        self.world.figures.finalized += 1

    @rule(which=st.integers(0, 1), back=st.integers(0, 3), roll_up=st.booleans())
    def finalize(self, which: int, back: int, roll_up: bool) -> None:
        self.step()
        self.maybe_roll_up(roll_up)
        months = self.periods()
        self.finalize_month(self.accounts[which], months[max(0, len(months) - 1 - back)])

    @rule(which=st.integers(0, 1), pick=st.integers(0, 10))
    def void(self, which: int, pick: int) -> None:
        self.step()
        account = self.accounts[which]
        live = [i for i in self.oracle.invoices if i.account == account and i.status == "finalized"]
        if not live:
            return
        invoice = live[pick % len(live)]
        self.world.unit(lambda s: invoices.void(s, invoice.id, "model", now=self.now))
        self.oracle.voided(invoice)

    # the end of a run -------------------------------------------------------------------

    def teardown(self) -> None:
        """Close every month: the spool replayed, a price for every model from the start,
        every task past its deadline; then every row and task is billed exactly once."""
        started = time.monotonic()
        try:
            self.close_every_month()
            self.world.figures.closing += time.monotonic() - started
        finally:
            super().teardown()

    def close_every_month(self) -> None:
        if not self.accounts:
            return
        self.write(self.spool)
        self.spool = []
        self.add_version(self.later, START - timedelta(days=60), "1.25", cached=False)
        self.now = BillingPeriod.of(self.now + EXPIRY).next().end + timedelta(hours=1)
        for account in self.accounts:
            self.oracle.expire(account, self.now)  # at its first finalization below
            for period in self.periods():
                due = self.oracle.expected(account, str(period))
                if due.lines or due.tasks or due.unpriced:
                    self.finalize_month(account, period, check_draft=False)
        for row in self.oracle.rows:
            task = self.oracle.covering(row)
            if task is None or (
                task.billed_as == "cost"
                and task.billed_rows_until is not None
                and row.seq is not None
                and row.seq > task.billed_rows_until
            ):
                assert row.billed_by is not None, row
        for task in self.oracle.tasks.values():
            if task.quoted:
                assert task.billed_by is not None, task
        self.check_every_row_billed_once()

    def check_every_row_billed_once(self) -> None:
        """Independently of the oracle's bookkeeping: the live invoices' exact amounts add
        up to every row's cost once plus every quoted task's bill once."""
        owed = Decimal(0)
        for row in self.oracle.rows:
            task = self.oracle.covering(row)
            if task is None or task.billed_as == "cost":
                priced = self.oracle.row_cost(row)
                assert priced is not None
                owed += priced[0]
        for task in self.oracle.tasks.values():
            if task.quoted and task.billed_as == "fixed_price":
                assert task.fixed_price is not None
                owed += task.fixed_price
        accounts = self.accounts

        async def billed(session: AsyncSession) -> Decimal:
            total = Decimal(0)
            for account in accounts:
                page = await invoices.list_invoices(
                    session, ADMIN, account, None, "finalized", 200, None
                )
                total += sum((Decimal(x.total_exact_usd) for x in page.data), Decimal(0))
            return total

        assert self.world.unit(billed) == owed


async def _create(session: AsyncSession, data: AccountCreate) -> Any:
    return await create_account(session, data)


@pytest.fixture
def world(fresh_database_url: str) -> Iterator[World]:
    loop = asyncio.new_event_loop()
    engine = create_engine(fresh_database_url, pool_size=2)
    connection = loop.run_until_complete(asyncpg.connect(asyncpg_dsn(fresh_database_url)))
    try:
        yield World(
            loop,
            engine,
            session_factory(engine),
            connection,
            Settings(task_expiry_s=EXPIRY.total_seconds()),
            Figures(),
        )
    finally:
        loop.run_until_complete(connection.close())
        loop.run_until_complete(engine.dispose())
        loop.close()


def test_every_row_is_billed_once_in_its_month_at_its_price(world: World) -> None:
    global WORLD
    WORLD = world
    started = time.monotonic()
    try:
        run_state_machine_as_test(
            BillingLifecycle,
            settings=settings(
                max_examples=EXAMPLES,
                stateful_step_count=STEPS,
                deadline=None,
                suppress_health_check=list(HealthCheck),
            ),
        )
    finally:
        WORLD = None
        figures = world.figures
        print(
            f"\n[billing model] examples={figures.examples} steps={figures.steps}"
            f" rows={figures.rows} finalized={figures.finalized}"
            f" refused={dict(sorted(figures.refused.items()))}"
            f" seconds={time.monotonic() - started:.1f} (closing months {figures.closing:.1f})"
        )
