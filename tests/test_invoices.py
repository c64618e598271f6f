"""Invoices through the billing API of a real `meterline serve`, on a database of their own.

Ledger rows are written straight into Postgres as the proxy writes them (exact cost and
price version, or NULL when unpriced), in past months so invoices can be finalized; the
invoice numbering and price versions are global, hence the module's own database.
"""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncSession

from pricing.cost import TokenUsage, usage_cost
from pricing.invoice import BillingPeriod
from pricing.money import round_cents
from pricing.prices import Price
from service.db.engine import create_engine, session_factory, transaction
from service.invoices.rollup import roll_up
from tests.conftest import Meterline, Upstream, _clone, _with_database, start_meterline
from tests.support import Database

NOW = datetime.now(UTC)
T = TypeVar("T")


def month(offset: int) -> BillingPeriod:
    """The month `offset` months from the current one (negative: in the past)."""
    index = NOW.year * 12 + NOW.month - 1 + offset
    return BillingPeriod(index // 12, index % 12 + 1)


def unique(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(4)}"


@dataclass
class Row:
    account_id: uuid.UUID
    model: str
    occurred_at: datetime
    prompt: int = 1000
    completion: int = 500
    cached: int = 0
    price: Price | None = None  # the version the proxy priced it with; None: unpriced
    task_id: str | None = None

    @property
    def usage(self) -> TokenUsage:
        return TokenUsage(self.prompt, self.completion, self.cached)

    @property
    def cost(self) -> Decimal | None:
        return None if self.price is None else usage_cost(self.usage, self.price)

    def cost_at(self, price: Price) -> Decimal:
        return usage_cost(self.usage, price)


class Billing:
    def __init__(self, server: Meterline, db: Database) -> None:
        self.server = server
        self.db = db
        self.admin = server.admin()

    def account(self, **fields: object) -> uuid.UUID:
        return uuid.UUID(str(self.server.new_account(**fields)["id"]))

    def price(
        self,
        model: str,
        input_rate: str,
        output_rate: str,
        effective_from: datetime,
        cached: str | None = None,
    ) -> Price:
        body: dict[str, Any] = {
            "model": model,
            "input_usd_per_mtok": input_rate,
            "output_usd_per_mtok": output_rate,
            "effective_from": effective_from.isoformat(),
        }
        if cached is not None:
            body["cached_input_usd_per_mtok"] = cached
        response = self.admin.post("/billing/prices", json=body)
        assert response.status_code == 201, response.text
        v = response.json()
        return Price(
            v["model"],
            Decimal(v["input_usd_per_mtok"]),
            Decimal(v["output_usd_per_mtok"]),
            datetime.fromisoformat(v["effective_from"]),
            None if v["cached_input_usd_per_mtok"] is None else Decimal(cached or 0),
            version_id=v["id"],
        )

    def insert(self, *rows: Row) -> None:
        async def run() -> None:
            connection = await asyncpg.connect(self.db.dsn)
            try:
                for month_start in sorted({BillingPeriod.of(r.occurred_at).start for r in rows}):
                    await connection.execute(
                        "SELECT meterline_ensure_usage_partition($1)", month_start
                    )
                await connection.executemany(
                    "INSERT INTO usage_ledger (request_id, occurred_at, account_id, endpoint,"
                    " requested_model, stream, status_code, prompt_tokens, completion_tokens,"
                    " total_tokens, cached_tokens, usage_source, cost_usd, price_version_id,"
                    " task_id) VALUES ($1, $2, $3, 'chat', $4, false, 200, $5, $6, $7, $8,"
                    " 'upstream', $9, $10, $11)",
                    [
                        (
                            "req_" + secrets.token_hex(12),
                            r.occurred_at,
                            r.account_id,
                            r.model,
                            r.prompt,
                            r.completion,
                            r.prompt + r.completion,
                            r.cached,
                            r.cost,
                            r.price.version_id if r.price else None,
                            r.task_id,
                        )
                        for r in rows
                    ],
                )
            finally:
                await connection.close()

        asyncio.run(run())

    def run(self, work: Callable[[AsyncSession], Awaitable[T]]) -> T:
        """`work` in one transaction of its own, as a request or the command line runs it."""

        async def run() -> T:
            engine = create_engine(self.db.url, pool_size=1)
            try:
                async with transaction(session_factory(engine)) as session:
                    return await work(session)
            finally:
                await engine.dispose()

        return asyncio.run(run())

    def roll_up(self) -> int:
        """What the server's background job does every minute: returns the rows added."""
        done = self.run(roll_up)
        assert done is not None
        return done.rows

    def generate(self, account_id: uuid.UUID, period: BillingPeriod, status: int = 201) -> Any:
        response = self.admin.post(
            "/billing/invoices", json={"account_id": str(account_id), "period": str(period)}
        )
        assert response.status_code == status, response.text
        return response.json()

    def finalize(self, invoice_id: str, status: int = 200) -> Any:
        response = self.admin.post(f"/billing/invoices/{invoice_id}/finalize")
        assert response.status_code == status, response.text
        return response.json()

    def get(self, invoice_id: str) -> Any:
        response = self.admin.get(f"/billing/invoices/{invoice_id}")
        assert response.status_code == 200, response.text
        return response.json()


@contextmanager
def billing_server(
    postgres_server: str, template_database: str, upstream: Upstream, workdir: Path
) -> Iterator[Billing]:
    """A Meterline server on a database of its own, with neither background roll-up nor
    task expiry: tests roll up and expire when they mean to, so each reads what it expects
    (the rollup and the ledger alone must give the same invoices)."""
    admin, name = _clone(postgres_server, template_database)
    url = _with_database(postgres_server, name)
    try:
        with start_meterline(
            url,
            upstream,
            workdir,
            METERLINE_USAGE_ROLLUP_INTERVAL_S="0",
            METERLINE_TASK_EXPIRY_INTERVAL_S="0",
        ) as server:
            billing = Billing(server, Database(url))
            yield billing
            billing.admin.close()
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def billing(
    postgres_server: str,
    template_database: str,
    upstream: Upstream,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Billing]:
    workdir = tmp_path_factory.mktemp("invoices")
    with billing_server(postgres_server, template_database, upstream, workdir) as billing:
        yield billing


def lines(invoice: Any, kind: str | None = None) -> list[Any]:
    return [line for line in invoice["lines"] if kind is None or line["kind"] == kind]


def exact_sum(invoice: Any, kind: str | None = None) -> Decimal:
    return sum((Decimal(line["amount_exact_usd"]) for line in lines(invoice, kind)), Decimal(0))


def assert_money_rules(invoice: Any) -> None:
    """Each line rounded once from its exact amount; the total is the sum of rounded lines."""
    for line in invoice["lines"]:
        assert Decimal(line["amount_usd"]) == round_cents(Decimal(line["amount_exact_usd"]))
    assert Decimal(invoice["total_usd"]) == sum(
        (Decimal(line["amount_usd"]) for line in invoice["lines"]), Decimal(0)
    )
    assert Decimal(invoice["total_exact_usd"]) == exact_sum(invoice)


def test_a_price_change_in_the_middle_of_the_month_gives_two_lines(billing: Billing) -> None:
    period = month(-3)
    model = unique("mid/")
    mid = period.start + timedelta(days=14, hours=6)
    v1 = billing.price(model, "1.25", "2.5", period.start)
    v2 = billing.price(model, "3", "4.125", mid)
    account = billing.account()
    days = [period.start + timedelta(days=d, hours=3) for d in range(27)]
    rows = [
        Row(account, model, at, 1000 + d, 333 * d + 1, price=v1 if at < mid else v2)
        for d, at in enumerate(days)
    ]
    # Two rows written before the price existed: the draft prices each by the version in
    # force at its own time, so they join the lines of their version.
    late_priced = [
        Row(account, model, mid - timedelta(hours=1), 7777, 1),
        Row(account, model, mid + timedelta(hours=1), 8888, 2),
    ]
    billing.insert(*rows, *late_priced)

    invoice = billing.generate(account, period)

    assert invoice["status"] == "draft" and invoice["number"] is None
    token_lines = lines(invoice, "tokens")
    assert [line["price_version_id"] for line in token_lines] == [v1.version_id, v2.version_id]
    first, second = token_lines
    assert (first["input_usd_per_mtok"], first["output_usd_per_mtok"]) == ("1.250000", "2.500000")
    assert (second["input_usd_per_mtok"], second["output_usd_per_mtok"]) == ("3.000000", "4.125000")
    before = [r for r in rows if r.occurred_at < mid]
    after = [r for r in rows if r.occurred_at >= mid]
    assert first["quantity"] == len(before) + 1 and second["quantity"] == len(after) + 1
    assert first["prompt_tokens"] == sum(r.prompt for r in before) + 7777
    assert Decimal(first["amount_exact_usd"]) == sum(
        (r.cost or Decimal(0) for r in before), late_priced[0].cost_at(v1)
    )
    assert Decimal(second["amount_exact_usd"]) == sum(
        (r.cost or Decimal(0) for r in after), late_priced[1].cost_at(v2)
    )
    assert invoice["unpriced_usage"] == []
    assert_money_rules(invoice)


def test_unpriced_usage_blocks_finalization_until_a_price_exists(billing: Billing) -> None:
    period = month(-3)
    model = unique("unpriced/")
    account = billing.account()
    at = period.start + timedelta(days=9)
    rows = [Row(account, model, at + timedelta(minutes=i), 1000 * (i + 1), 10) for i in range(3)]
    billing.insert(*rows)

    draft = billing.generate(account, period)
    assert lines(draft) == []
    assert draft["unpriced_usage"] == [
        {
            "model": model,
            "period": None,
            "task_type": None,
            "requests": 3,
            "prompt_tokens": 6000,
            "completion_tokens": 30,
        }
    ]
    report = billing.admin.get(
        "/billing/reports/unpriced", params={"period": str(period), "account_id": str(account)}
    ).json()["data"]
    assert [(r["model"], r["requests"], r["requests_without_price"]) for r in report] == [
        (model, 3, 3)
    ]

    refused = billing.admin.post(f"/billing/invoices/{draft['id']}/finalize")
    assert refused.status_code == 409
    assert refused.json()["error"]["code"] == "unpriced_usage"
    assert model in refused.json()["error"]["message"]
    assert billing.get(draft["id"])["status"] == "draft"

    # A price that took effect before the usage; the rows themselves never change.
    price = billing.price(model, "2", "10", period.start - timedelta(days=1))
    stored = billing.db.fetch(
        "SELECT cost_usd, price_version_id FROM usage_ledger WHERE requested_model = $1", model
    )
    assert stored == [{"cost_usd": None, "price_version_id": None}] * 3
    report = billing.admin.get(
        "/billing/reports/unpriced", params={"period": str(period), "account_id": str(account)}
    ).json()["data"]
    assert [(r["requests_priced_now"], r["requests_without_price"]) for r in report] == [(3, 0)]

    final = billing.finalize(draft["id"])
    assert final["status"] == "finalized" and final["number"].startswith(f"INV-{NOW.year}-")
    (line,) = lines(final)
    assert line["price_version_id"] == price.version_id
    assert Decimal(line["amount_exact_usd"]) == sum(r.cost_at(price) for r in rows)
    assert final["unpriced_usage"] == []


def test_late_usage_goes_on_the_next_invoice_exactly_once(billing: Billing) -> None:
    p1, p2, p3 = month(-6), month(-5), month(-4)
    model = unique("late/")
    price = billing.price(model, "1", "3", p1.start - timedelta(days=1))
    account = billing.account()

    def row(period: BillingPeriod, day: int, prompt: int) -> Row:
        return Row(account, model, period.start + timedelta(days=day), prompt, 100, price=price)

    on_time = [row(p1, 3, 1000), row(p1, 20, 2000)]
    billing.insert(*on_time)
    jan = billing.finalize(billing.generate(account, p1)["id"])
    assert Decimal(jan["total_exact_usd"]) == sum(r.cost_at(price) for r in on_time)

    late_1 = row(p1, 27, 50_000)  # replayed from a spool after p1 was finalized
    billing.insert(late_1)
    refused = billing.admin.post(
        "/billing/invoices", json={"account_id": str(account), "period": str(p1)}
    )
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "invoice_finalized"
    assert billing.get(jan["id"]) == jan

    feb_rows = [row(p2, 1, 3000)]
    billing.insert(*feb_rows)
    feb = billing.generate(account, p2)
    (late_line,) = lines(feb, "late_usage")
    assert late_line["period"] == str(p1)
    assert late_line["description"].startswith(f"Late usage from {p1}")
    assert Decimal(late_line["amount_exact_usd"]) == late_1.cost_at(price)
    assert Decimal(lines(feb, "tokens")[0]["amount_exact_usd"]) == feb_rows[0].cost_at(price)
    feb = billing.finalize(feb["id"])

    # More late rows, of both finalized months, after the next invoice too.
    late_2, late_3 = row(p1, 28, 70_000), row(p2, 5, 90_000)
    billing.insert(late_2, late_3)
    mar = billing.finalize(billing.generate(account, p3)["id"])
    assert [(x["period"], Decimal(x["amount_exact_usd"])) for x in lines(mar, "late_usage")] == [
        (str(p1), late_2.cost_at(price)),
        (str(p2), late_3.cost_at(price)),
    ]
    assert lines(mar, "tokens") == []

    everything = [*on_time, late_1, *feb_rows, late_2, late_3]
    billed = sum((Decimal(i["total_exact_usd"]) for i in (jan, feb, mar)), Decimal(0))
    assert billed == sum(r.cost_at(price) for r in everything)
    for invoice in (jan, feb, mar):
        assert_money_rules(invoice)


def test_a_void_keeps_its_number_and_the_month_can_be_invoiced_again(billing: Billing) -> None:
    period = month(-7)
    model = unique("void/")
    price = billing.price(model, "5", "5", period.start)
    account = billing.account()
    billing.insert(Row(account, model, period.start + timedelta(days=2), 10_000, 0, price=price))
    first = billing.finalize(billing.generate(account, period)["id"])

    missing_reason = billing.admin.post(f"/billing/invoices/{first['id']}/void", json={})
    assert missing_reason.status_code == 422
    voided = billing.admin.post(
        f"/billing/invoices/{first['id']}/void", json={"reason": "wrong customer address"}
    )
    assert voided.status_code == 200, voided.text
    void = voided.json()
    assert void["status"] == "void" and void["number"] == first["number"]
    assert void["void_reason"] == "wrong customer address" and void["voided_at"]
    assert void["lines"] == first["lines"]
    again = billing.admin.post(f"/billing/invoices/{first['id']}/void", json={"reason": "x"})
    assert again.status_code == 409
    assert billing.admin.post(f"/billing/invoices/{first['id']}/finalize").status_code == 409

    replacement = billing.generate(account, period)
    assert replacement["id"] != first["id"] and replacement["status"] == "draft"
    assert replacement["lines"] == first["lines"]
    final = billing.finalize(replacement["id"])
    assert final["number"] != first["number"]
    listed = billing.admin.get("/billing/invoices", params={"account_id": str(account)}).json()
    assert sorted(i["status"] for i in listed["data"]) == ["finalized", "void"]


def test_an_account_without_usage_gets_an_empty_invoice(billing: Billing) -> None:
    account = billing.account()
    draft = billing.generate(account, month(-2))
    assert (draft["lines"], draft["total_usd"], draft["unpriced_usage"]) == ([], "0.00", [])
    final = billing.finalize(draft["id"])
    assert final["status"] == "finalized" and final["total_usd"] == "0.00"


def test_sub_cent_lines_are_rounded_once_each(billing: Billing) -> None:
    period = month(-2)
    account = billing.account()
    cheap = billing.price(unique("subcent/"), "4", "0", period.start)
    dearer = billing.price(unique("subcent/"), "5", "0", period.start)
    at = period.start + timedelta(days=1)
    billing.insert(
        Row(account, cheap.model, at, 1000, 0, price=cheap),  # $0.004
        Row(account, dearer.model, at, 1000, 0, price=dearer),  # $0.005
    )
    invoice = billing.generate(account, period)
    assert sorted((x["amount_exact_usd"], x["amount_usd"]) for x in lines(invoice)) == [
        ("0.004000000000", "0.00"),
        ("0.005000000000", "0.01"),
    ]
    assert invoice["total_usd"] == "0.01" and invoice["total_exact_usd"] == "0.009000000000"


def test_regenerating_changes_nothing_and_a_later_price_leaves_a_finalized_invoice_alone(
    billing: Billing,
) -> None:
    period = month(-9)
    model = unique("frozen/")
    price = billing.price(model, "0.4", "0.4", period.start)
    account = billing.account()
    billing.insert(
        *(
            Row(account, model, period.start + timedelta(hours=h), 100 * h, h, price=price)
            for h in range(50)
        )
    )
    first = billing.generate(account, period)
    second = billing.generate(account, period, status=200)
    assert second["id"] == first["id"]
    assert (second["lines"], second["total_usd"]) == (first["lines"], first["total_usd"])

    final = billing.finalize(first["id"])
    billing.price(model, "9", "9", period.start - timedelta(days=30))  # backdated, dearer
    billing.price(model, "7", "7", period.start + timedelta(days=3))
    assert billing.get(final["id"]) == final


def test_invoice_numbers_are_gapless_under_concurrent_finalization(billing: Billing) -> None:
    period = month(-10)
    drafts = [billing.generate(billing.account(), period)["id"] for _ in range(6)]
    with ThreadPoolExecutor(6) as pool:
        finals = list(pool.map(billing.finalize, drafts))
    numbers = [f["number"] for f in finals]
    assert len(set(numbers)) == 6
    # Every number given in this database so far (voided ones keep theirs), refusals
    # included, forms 1..N with no gap.
    given = billing.db.fetch("SELECT number FROM invoices WHERE number IS NOT NULL")
    sequence = sorted(int(r["number"].rsplit("-", 1)[1]) for r in given)
    assert sequence == list(range(1, len(sequence) + 1))
    assert all(r["number"].startswith(f"INV-{NOW.year}-") for r in given)


def test_finalizing_waits_for_the_month_to_end_and_future_months_are_refused(
    billing: Billing,
) -> None:
    account = billing.account()
    current = billing.generate(account, month(0))
    refused = billing.admin.post(f"/billing/invoices/{current['id']}/finalize")
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "period_not_over"
    future = billing.admin.post(
        "/billing/invoices", json={"account_id": str(account), "period": str(month(1))}
    )
    assert future.status_code == 400 and future.json()["error"]["code"] == "period_in_future"
    bad = billing.admin.post(
        "/billing/invoices", json={"account_id": str(account), "period": "2026-13"}
    )
    assert bad.status_code == 422
    unknown = billing.admin.post(
        "/billing/invoices", json={"account_id": str(uuid.uuid4()), "period": str(month(-1))}
    )
    assert unknown.status_code == 404
    assert billing.admin.get(f"/billing/invoices/{uuid.uuid4()}").status_code == 404


# Quoted tasks in these tests were accepted long before their requests.
LONG_AGO = datetime(2000, 1, 1, tzinfo=UTC)
BILLED_AS = {"succeeded": "fixed_price", "failed": "free", "expired": "fixed_price", "open": None}


def _quoted_task(
    billing: Billing,
    account: uuid.UUID,
    external_id: str,
    status: str,
    completed_at: datetime | None,
    fixed_price: str,
    model: str,
    *,
    accepted_at: datetime = LONG_AGO,
    billed_as: str | None = None,
) -> uuid.UUID:
    """A task as accepting its quote and completing it leave it (how it is billed: as its
    outcome and the account's default policies decide, unless `billed_as` says)."""
    quote = billing.db.fetchval(
        "INSERT INTO quotes (account_id, task_type, model, basis, sample_size, confidence,"
        " margin, expected_cost_usd, quantile_cost_usd, price_usd, valid_until, accepted_at)"
        " VALUES ($1, 'summarize', $2, 'estimate', 0, 0.9, 0.2, 0.01, 0.01, $3, now(), now())"
        " RETURNING id",
        account,
        model,
        Decimal(fixed_price),
    )
    task_id: uuid.UUID = billing.db.fetchval(
        "INSERT INTO tasks (account_id, external_id, task_type, model, quote_id,"
        " fixed_price_usd, status, completed_at, created_at, billed_as)"
        " VALUES ($1, $2, 'summarize', $3, $4, $5, $6, $7, $8, $9) RETURNING id",
        account,
        external_id,
        model,
        quote,
        Decimal(fixed_price),
        status,
        completed_at,
        accepted_at,
        billed_as or BILLED_AS[status],
    )
    return task_id


def test_quoted_tasks_are_billed_their_fixed_price_never_their_tokens(billing: Billing) -> None:
    period = month(-3)
    model = unique("tasks/")
    price = billing.price(model, "10", "20", period.start)
    account = billing.account()
    at = period.start + timedelta(days=5)
    done = at + timedelta(hours=1)

    def used(task_id: str | None, prompt: int) -> Row:
        return Row(account, model, at, prompt, 100, price=price, task_id=task_id)

    _quoted_task(billing, account, "ok-1", "succeeded", done, "1.50", model)
    _quoted_task(billing, account, "ok-2", "succeeded", done, "1.50", model)
    _quoted_task(billing, account, "broke", "failed", done, "2.00", model)
    _quoted_task(billing, account, "running", "open", None, "3.00", model)
    # Used this month, completed next month: billed there, its tokens never.
    _quoted_task(
        billing, account, "slow", "succeeded", period.end + timedelta(hours=2), "4.00", model
    )
    billing.db.execute(
        "INSERT INTO tasks (account_id, external_id, task_type, status, completed_at)"
        " VALUES ($1, 'plain', 'summarize', 'succeeded', $2)",
        account,
        done,
    )
    quoted = [used("ok-1", 1000), used("ok-2", 2000), used("running", 4000), used("slow", 5000)]
    failed = [used("broke", 3000), used("broke", 3500)]
    per_token = [used("plain", 6000), used(None, 7000), used("never-heard-of", 8000)]
    billing.insert(*quoted, *failed, *per_token)

    invoice = billing.generate(account, period)
    (task_line,) = lines(invoice, "task")
    assert (task_line["task_type"], task_line["model"], task_line["quantity"]) == (
        "summarize",
        model,
        2,
    )
    assert Decimal(task_line["unit_price_usd"]) == Decimal("1.50")
    assert task_line["amount_usd"] == "3.00"
    (token_line,) = lines(invoice, "tokens")
    assert token_line["quantity"] == len(per_token)
    assert Decimal(token_line["amount_exact_usd"]) == sum(r.cost_at(price) for r in per_token)
    assert_money_rules(invoice)

    # A failed task completed under the `cost` policy is billed its actual token cost; one
    # completed under `free` stays free when the account's policy changes later.
    billing.db.execute("UPDATE accounts SET failed_task_policy = 'cost' WHERE id = $1", account)
    assert billing.generate(account, period, status=200)["lines"] == invoice["lines"]
    _quoted_task(billing, account, "broke-2", "failed", done, "2.00", model, billed_as="cost")
    broke_2 = [used("broke-2", 900)]
    billing.insert(*broke_2)
    at_cost = billing.generate(account, period, status=200)
    failed_line = [x for x in lines(at_cost, "task") if x["unit_price_usd"] is None]
    assert [(x["quantity"], Decimal(x["amount_exact_usd"])) for x in failed_line] == [
        (1, sum(r.cost_at(price) for r in broke_2))
    ]
    assert Decimal(at_cost["total_exact_usd"]) == Decimal("3.00") + sum(
        r.cost_at(price) for r in [*broke_2, *per_token]
    )

    # The task completed next month is on next month's invoice, as a fixed price only.
    following = billing.generate(account, period.next())
    assert [(x["kind"], x["quantity"], x["amount_usd"]) for x in lines(following)] == [
        ("task", 1, "4.00")
    ]


def test_a_customer_reads_only_its_own_invoices(billing: Billing) -> None:
    mine = billing.account()
    key = billing.server.new_key(mine)
    theirs = billing.account()
    my_invoice = billing.generate(mine, month(-1))
    their_invoice = billing.generate(theirs, month(-1))
    customer = httpx.Client(
        base_url=billing.server.url, headers={"Authorization": f"Bearer {key}"}, timeout=30
    )
    with customer:
        assert customer.get(f"/billing/invoices/{my_invoice['id']}").json() == my_invoice
        assert customer.get(f"/billing/invoices/{their_invoice['id']}").status_code == 404
        listed = customer.get("/billing/invoices").json()["data"]
        assert [i["id"] for i in listed] == [my_invoice["id"]]
        assert (
            customer.get("/billing/invoices", params={"account_id": str(theirs)}).status_code == 404
        )
        body = {"account_id": str(mine), "period": str(month(-1))}
        assert customer.post("/billing/invoices", json=body).status_code == 404
        assert customer.post(f"/billing/invoices/{my_invoice['id']}/finalize").status_code == 404
        report = customer.get("/billing/reports/unpriced", params={"period": str(month(-1))})
        assert report.status_code == 200
        assert customer.get("/billing/prices").status_code == 200
        new_price = {"model": "x", "input_usd_per_mtok": "1", "output_usd_per_mtok": "1"}
        assert customer.post("/billing/prices", json=new_price).status_code == 404


def test_invoices_are_listed_newest_month_first_in_pages(billing: Billing) -> None:
    account = billing.account()
    for offset in (-13, -12, -11):
        billing.generate(account, month(offset))
    page = billing.admin.get(
        "/billing/invoices", params={"account_id": str(account), "limit": 2}
    ).json()
    assert [i["period"] for i in page["data"]] == [str(month(-11)), str(month(-12))]
    assert page["has_more"]
    rest = billing.admin.get(
        "/billing/invoices",
        params={"account_id": str(account), "limit": 2, "cursor": page["next_cursor"]},
    ).json()
    assert [i["period"] for i in rest["data"]] == [str(month(-13))]
    assert not rest["has_more"]
    drafts = billing.admin.get(
        "/billing/invoices", params={"account_id": str(account), "status": "finalized"}
    ).json()
    assert drafts["data"] == []


def test_invoices_read_from_the_rollup_are_the_ledgers_to_the_cent(billing: Billing) -> None:
    period = month(-11)
    model = unique("rollup/")
    price = billing.price(model, "0.7", "2.1", period.start, cached="0.07")
    account = billing.account()
    at = period.start + timedelta(days=4)
    _quoted_task(billing, account, "fixed", "succeeded", at + timedelta(hours=1), "0.50", model)
    priced = [
        Row(account, model, at + timedelta(minutes=i), 900 + i, 40 + i, cached=300, price=price)
        for i in range(20)
    ]
    in_task = [Row(account, model, at, 5000, 5000, price=price, task_id="fixed")]
    unpriced = [Row(account, unique("norollup/"), at, 1000, 1000)]
    billing.insert(*priced, *in_task, *unpriced)
    from_ledger = billing.generate(account, period)

    assert billing.roll_up() >= len(priced) + len(in_task)
    assert billing.roll_up() == 0  # nothing new since
    from_rollup = billing.generate(account, period, status=200)
    assert from_rollup["lines"] == from_ledger["lines"]
    assert from_rollup["unpriced_usage"] == from_ledger["unpriced_usage"] != []
    rolled = billing.db.fetch(
        "SELECT task_id, requests, cached_tokens, cost_usd FROM usage_rollup"
        " WHERE account_id = $1 ORDER BY task_id",
        account,
    )
    assert [(r["task_id"], r["requests"]) for r in rolled] == [("", 20), ("fixed", 1)]
    assert rolled[0]["cost_usd"] == sum(r.cost_at(price) for r in priced)

    # Rows recorded after the roll-up are read from the ledger, beside the rollup.
    later = [Row(account, model, at + timedelta(days=1), 123, 456, price=price)]
    billing.insert(*later)
    refreshed = billing.generate(account, period, status=200)
    (tokens,) = lines(refreshed, "tokens")
    assert tokens["quantity"] == len(priced) + len(later)
    assert Decimal(tokens["amount_exact_usd"]) == sum(r.cost_at(price) for r in [*priced, *later])
    assert tokens["cached_tokens"] == 300 * len(priced)
    assert [x["amount_usd"] for x in lines(refreshed, "task")] == ["0.50"]
