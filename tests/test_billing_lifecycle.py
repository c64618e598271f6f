"""The billing lifecycle across the rollup, open transactions, task deadlines, late
completions and the monthly export: every row and every task billed once, by the rules.

Most tests drive the invoice and task operations as the server runs them, in a
transaction of their own with an explicit `now` where time matters (a past month can then
be completed, expired or finalized as of an instant inside it), and read the results
through the billing API of a real `meterline serve` on the module's own database.
"""

from __future__ import annotations

import asyncio
import csv
import io
import secrets
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import openai
import pytest

from pricing.invoice import BillingPeriod
from service.auth.principal import Principal
from service.errors import Conflict
from service.invoices import service as invoices
from service.invoices.repository.cutoff import CutoffRepository
from service.tasks import service as tasks
from service.tasks.expiry import expire_tasks
from tests.conftest import Meterline, Upstream, start_meterline
from tests.support import Database
from tests.test_invoices import (
    NOW,
    Billing,
    Row,
    _quoted_task,
    assert_money_rules,
    billing_server,
    exact_sum,
    lines,
    month,
    unique,
)
from tests.test_outcome import Customer, ledger_rows
from tests.usage_rows import insert_usage, usage_row

ADMIN = Principal(account_id=None, key_id=None)


@pytest.fixture(scope="module")
def billing(
    postgres_server: str,
    template_database: str,
    upstream: Upstream,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Billing]:
    workdir = tmp_path_factory.mktemp("lifecycle")
    with billing_server(postgres_server, template_database, upstream, workdir) as server:
        yield server


@contextmanager
def open_transaction(db: Database) -> Iterator[Callable[..., Any]]:
    """A session left inside BEGIN (as a `psql` would be) until the block ends; the function
    it yields runs one more statement in that transaction."""
    loop = asyncio.new_event_loop()
    connection = loop.run_until_complete(asyncpg.connect(db.dsn))
    loop.run_until_complete(connection.execute("BEGIN"))

    def run(sql: str, *args: Any) -> Any:
        return loop.run_until_complete(connection.fetchval(sql, *args))

    try:
        yield run
    finally:
        loop.run_until_complete(connection.close())
        loop.close()


WRITE_ROW = (
    "INSERT INTO usage_ledger (request_id, occurred_at, account_id, endpoint, requested_model,"
    " stream, status_code, prompt_tokens, completion_tokens, total_tokens, usage_source,"
    " cost_usd) VALUES ($1, $2, $3, 'chat', 'mock-chat', false, 200, 1, 1, 2, 'upstream',"
    " 0.000001) RETURNING recorded_at"
)


def adjustment(account: uuid.UUID, at: datetime, model: str, amount: str) -> dict[str, Any]:
    return usage_row(
        account, at, model=model, kind="adjustment", prompt=0, completion=0, cost=amount
    )


def generate(billing: Billing, account: uuid.UUID, period: BillingPeriod, now: datetime) -> Any:
    """The account's draft as of `now` (tasks past their deadline expire first)."""
    result = billing.run(lambda s: invoices.generate(s, period, [account], now=now))
    return billing.get(str(result.invoice_ids[account]))


def finalize(billing: Billing, invoice: Any, now: datetime) -> Any:
    billing.run(lambda s: invoices.finalize(s, uuid.UUID(invoice["id"]), now=now))
    return billing.get(invoice["id"])


def open_task(
    billing: Billing,
    account: uuid.UUID,
    model: str,
    fixed_price: str,
    accepted_at: datetime,
    expires_after: timedelta = timedelta(days=7),
) -> str:
    """A task whose quote was accepted at `accepted_at`, as accepting leaves it."""
    task_id = unique("open-")
    _quoted_task(
        billing, account, task_id, "open", None, fixed_price, model, accepted_at=accepted_at
    )
    billing.db.execute(
        "UPDATE tasks SET expires_at = created_at + $3::interval"
        " WHERE account_id = $1 AND external_id = $2",
        account,
        task_id,
        expires_after,
    )
    return task_id


def expire(billing: Billing, account: uuid.UUID, now: datetime) -> int:
    return billing.run(lambda s: expire_tasks(s, now, [account]))


def task_row(billing: Billing, account: uuid.UUID, task_id: str) -> dict[str, Any]:
    (row,) = billing.db.fetch(
        "SELECT * FROM tasks WHERE account_id = $1 AND external_id = $2", account, task_id
    )
    return row


# -- rows without a price version, across the rollup's watermark ---------------------------


def test_rows_without_a_price_version_count_once_on_each_side_of_the_rollup_watermark(
    billing: Billing,
) -> None:
    period = month(-14)
    model = unique("adj/")
    price = billing.price(model, "1", "1", period.start)
    unpriced_model = unique("adjunpriced/")
    account = billing.account()
    at = period.start + timedelta(days=3)
    billing.insert(Row(account, model, at, 500_000, 500_000, price=price))  # $1.00
    insert_usage(
        billing.db,
        adjustment(account, at, model, "-0.40"),
        usage_row(account, at, model=unpriced_model, cost=None),
    )
    assert billing.roll_up() == 1  # the priced row; the others have no price version
    insert_usage(
        billing.db,
        adjustment(account, at + timedelta(hours=1), model, "-0.25"),
        adjustment(account, at + timedelta(hours=2), model, "50.00"),
    )

    invoice = billing.generate(account, period)

    (credit,) = lines(invoice, "adjustment")
    assert (credit["quantity"], Decimal(credit["amount_exact_usd"])) == (3, Decimal("49.35"))
    assert Decimal(invoice["total_exact_usd"]) == Decimal("50.35")
    assert [(u["model"], u["requests"]) for u in invoice["unpriced_usage"]] == [(unpriced_model, 1)]
    refused = billing.admin.post(f"/billing/invoices/{invoice['id']}/finalize")
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "unpriced_usage"
    assert_money_rules(invoice)


# -- the cutoff and open transactions ------------------------------------------------------


def test_an_idle_transaction_elsewhere_does_not_move_usage_to_the_next_month(
    billing: Billing,
) -> None:
    period = month(-15)
    model = unique("idle/")
    price = billing.price(model, "2", "2", period.start)
    account = billing.account()
    with open_transaction(billing.db) as idle:
        idle("SELECT 1")  # a `psql` left inside BEGIN
        row = Row(account, model, period.start + timedelta(days=8), 500_000, 500_000, price=price)
        billing.insert(row)  # committed while that session idles
        final = billing.finalize(billing.generate(account, period)["id"])
    assert exact_sum(final, "tokens") == row.cost == Decimal("2")
    assert lines(billing.generate(account, period.next()), "late_usage") == []


def test_the_cutoff_waits_for_ledger_writes_only(billing: Billing) -> None:
    account = billing.account()
    at = NOW - timedelta(minutes=1)
    insert_usage(billing.db, usage_row(account, at))  # the month's partition

    def cutoff() -> datetime:
        return billing.run(lambda s: CutoffRepository(s).usage_cutoff())

    with open_transaction(billing.db) as writer, open_transaction(billing.db) as idle:
        idle("SELECT 1")
        recorded = writer(WRITE_ROW, "req_" + secrets.token_hex(12), at, account)
        started = writer("SELECT now()")
        # An uncommitted ledger write holds the cutoff before it began; an idle one does not.
        assert cutoff() < started <= recorded
        writer("COMMIT")
        assert cutoff() > recorded
        # A transaction that began before a cutoff but writes after it stamps its rows after
        # it: the cutoff never passes a row that is not committed yet.
        writer("BEGIN")
        writer("SELECT 1")
        taken = cutoff()
        late = writer(WRITE_ROW, "req_" + secrets.token_hex(12), at, account)
        assert late > taken


def test_finalizing_waits_for_a_ledger_write_begun_before_the_month_ended(
    billing: Billing,
) -> None:
    account = billing.account()
    period = month(0)
    draft = billing.generate(account, period)
    insert_usage(billing.db, usage_row(account, NOW))
    with open_transaction(billing.db) as writer:
        writer(WRITE_ROW, "req_" + secrets.token_hex(12), NOW, account)
        pid = writer("SELECT pg_backend_pid()")
        after_the_month = period.end + timedelta(hours=1)
        began = time.monotonic()
        with pytest.raises(Conflict) as refused:
            billing.run(
                lambda s: invoices.finalize(
                    s, uuid.UUID(draft["id"]), now=after_the_month, wait_s=0.5
                )
            )
        assert time.monotonic() - began >= 0.5
    assert refused.value.code == "ledger_write_in_progress"
    assert f"pid {pid}" in refused.value.message and str(period) in refused.value.message
    assert billing.get(draft["id"])["status"] == "draft"


# -- quoted tasks: acceptance, deadline, late completion, policy at completion -------------


def test_requests_before_a_quote_is_accepted_are_billed_per_token(billing: Billing) -> None:
    period = month(-16)
    model = unique("accept/")
    price = billing.price(model, "1", "1", period.start)
    account = billing.account()
    accepted = period.start + timedelta(days=10)
    _quoted_task(
        billing,
        account,
        "job",
        "succeeded",
        accepted + timedelta(days=2),
        "0.40",
        model,
        accepted_at=accepted,
    )
    # Two requests sent before the quote was accepted (still in the writer's queue when it
    # was), three after.
    before = [
        Row(account, model, accepted - timedelta(minutes=m), 100_000, 0, price=price, task_id="job")
        for m in (1, 2)
    ]
    after = [
        Row(account, model, accepted + timedelta(minutes=m), 100_000, 0, price=price, task_id="job")
        for m in (0, 1, 2)
    ]
    billing.insert(*before, *after)

    from_ledger = billing.generate(account, period)
    (tokens,) = lines(from_ledger, "tokens")
    assert tokens["quantity"] == 2
    assert Decimal(tokens["amount_exact_usd"]) == sum(r.cost_at(price) for r in before)
    assert [x["amount_usd"] for x in lines(from_ledger, "task")] == ["0.40"]
    billing.roll_up()
    assert billing.generate(account, period, status=200)["lines"] == from_ledger["lines"]
    seen = billing.admin.get(f"/billing/tasks/job?account_id={account}").json()
    assert seen["requests"] == 3
    assert Decimal(seen["cost_usd"]) == sum(r.cost_at(price) for r in after)


def test_an_open_quoted_task_expires_at_its_deadline_and_is_billed_its_fixed_price(
    billing: Billing,
) -> None:
    period = month(-17)
    model = unique("expire/")
    price = billing.price(model, "1", "1", period.start)
    account = billing.account()
    accepted = period.start + timedelta(days=3)
    task_id = open_task(billing, account, model, "0.90", accepted)
    billing.insert(
        Row(account, model, accepted + timedelta(hours=1), 10**6, 0, price=price, task_id=task_id)
    )

    # Nothing expired it before the month's invoice: the invoice does, as of its time.
    invoice = generate(billing, account, period, now=period.end + timedelta(days=1))
    task = task_row(billing, account, task_id)
    assert (task["status"], task["billed_as"]) == ("expired", "fixed_price")
    assert task["completed_at"] == task["expires_at"] == accepted + timedelta(days=7)
    (line,) = lines(invoice)
    assert (line["kind"], line["quantity"], line["amount_usd"]) == ("task", 1, "0.90")
    assert "expired open" in line["description"]

    # Idempotent: expiring again or regenerating changes nothing.
    assert billing.run(lambda s: expire_tasks(s, period.end + timedelta(days=30))) == 0
    assert (
        generate(billing, account, period, now=period.end + timedelta(days=2))["lines"]
        == (invoice["lines"])
    )
    done = billing.admin.post(
        f"/billing/tasks/{task_id}/complete?account_id={account}", json={"outcome": "failed"}
    )
    assert done.status_code == 409 and "expired" in done.json()["error"]["message"]


def test_a_task_expires_only_after_its_deadline_and_by_its_accounts_policy(
    billing: Billing,
) -> None:
    period = month(-18)
    model = unique("policy/")
    price = billing.price(model, "1", "1", period.start)
    accepted = period.start + timedelta(days=1)
    deadline = accepted + timedelta(days=7)
    bills = {}
    for policy in ("cost", "free"):
        account = billing.account(expired_task_policy=policy)
        task_id = open_task(billing, account, model, "5.00", accepted)
        row = Row(
            account, model, accepted + timedelta(hours=2), 250_000, 0, price=price, task_id=task_id
        )
        billing.insert(row)
        assert expire(billing, account, deadline - timedelta(microseconds=1)) == 0
        assert task_row(billing, account, task_id)["status"] == "open"
        assert expire(billing, account, deadline) == 1
        assert task_row(billing, account, task_id)["billed_as"] == policy
        bills[policy] = (generate(billing, account, period, now=period.end), row)
    at_cost, row = bills["cost"]
    (line,) = lines(at_cost)
    assert (line["kind"], Decimal(line["amount_exact_usd"])) == ("task", row.cost_at(price))
    free, _ = bills["free"]
    assert free["lines"] == [] and free["total_usd"] == "0.00"


def test_a_task_completed_after_its_months_invoice_goes_on_the_next_one_once(
    billing: Billing,
) -> None:
    p1 = month(-20)
    p2, p3 = p1.next(), p1.next().next()
    model = unique("latecomplete/")
    price = billing.price(model, "1", "1", p1.start)
    account = billing.account()
    task_id = open_task(billing, account, model, "1.25", p1.start + timedelta(days=27))
    billing.insert(
        Row(account, model, p1.start + timedelta(days=28), 10**6, 0, price=price, task_id=task_id)
    )
    first = finalize(billing, generate(billing, account, p1, p1.end), p1.end)
    assert first["lines"] == []

    # The completion's transaction began in p1 and committed after p1's invoice.
    late = p1.end - timedelta(seconds=1)
    billing.run(
        lambda s: tasks.complete_task(s, None, ADMIN, task_id, account, "succeeded", now=late)
    )

    second = generate(billing, account, p2, p2.end)
    (line,) = lines(second)
    assert (line["kind"], line["period"], line["amount_usd"]) == ("late_task", str(p1), "1.25")
    assert line["description"].startswith(f"Late from {p1}: 1 x summarize")
    second = finalize(billing, second, p2.end)
    assert task_row(billing, account, task_id)["billed_invoice_id"] == uuid.UUID(second["id"])
    assert lines(generate(billing, account, p3, p3.end)) == []

    # Voided, the next month's invoice bills nothing any more: the task is billed again.
    billing.run(lambda s: invoices.void(s, uuid.UUID(second["id"]), "wrong address"))
    assert task_row(billing, account, task_id)["billed_invoice_id"] is None
    again = finalize(billing, generate(billing, account, p2, p2.end), p2.end)
    assert [x["amount_usd"] for x in lines(again, "late_task")] == ["1.25"]


def test_rows_of_a_task_billed_at_cost_that_arrive_after_its_invoice_are_billed_once(
    billing: Billing,
) -> None:
    p1 = month(-24)
    p2, p3 = p1.next(), p1.next().next()
    model = unique("latecost/")
    price = billing.price(model, "1", "0", p1.start)
    account = billing.account(failed_task_policy="cost")
    task_id = open_task(billing, account, model, "9.00", p1.start + timedelta(days=1))

    def row(day: int, prompt: int) -> Row:
        return Row(
            account, model, p1.start + timedelta(days=day), prompt, 0, price=price, task_id=task_id
        )

    on_time = [row(2, 100_000), row(3, 200_000)]
    billing.insert(*on_time)
    billing.run(
        lambda s: tasks.complete_task(
            s, None, ADMIN, task_id, account, "failed", now=p1.start + timedelta(days=4)
        )
    )
    first = finalize(billing, generate(billing, account, p1, p1.end), p1.end)
    assert exact_sum(first, "task") == sum(r.cost_at(price) for r in on_time)

    late_1 = row(3, 400_000)  # replayed from a spool after p1's invoice
    billing.insert(late_1)
    second = generate(billing, account, p2, p2.end)
    (line,) = lines(second)
    assert (line["kind"], line["period"], line["quantity"]) == ("late_task", str(p1), 1)
    assert Decimal(line["amount_exact_usd"]) == late_1.cost_at(price)
    assert "recorded after they were billed" in line["description"]
    second = finalize(billing, second, p2.end)
    assert lines(generate(billing, account, p3, p3.end)) == []

    late_2 = row(2, 800_000)
    billing.insert(late_2)
    third = finalize(billing, generate(billing, account, p3, p3.end), p3.end)
    assert exact_sum(third, "late_task") == late_2.cost_at(price)

    # The first invoice voided and issued again bills the task's rows it billed, no more.
    billing.run(lambda s: invoices.void(s, uuid.UUID(first["id"]), "reissued"))
    reissued = finalize(billing, generate(billing, account, p1, p1.end), p1.end)
    assert reissued["lines"] == first["lines"]
    billed = sum((Decimal(i["total_exact_usd"]) for i in (reissued, second, third)), Decimal(0))
    assert billed == sum(r.cost_at(price) for r in [*on_time, late_1, late_2])


def test_a_completed_task_is_billed_by_the_policy_in_force_at_its_completion(
    meterline: Meterline, db: Database
) -> None:
    customer = Customer(meterline)

    def fail(task_id: str) -> str:
        with meterline.admin() as admin:
            done = admin.post(
                f"/billing/tasks/{task_id}/complete",
                params={"account_id": str(customer.account_id)},
                json={"outcome": "failed"},
            )
        assert done.status_code == 200, done.text
        billed_as: str = done.json()["billed_as"]
        return billed_as

    first = customer.quoted_task()
    customer.agent_step(first["id"])
    ledger_rows(db, customer.account_id, 2, first["id"])
    assert fail(first["id"]) == "free"
    with meterline.admin() as admin:
        changed = admin.patch(
            f"/billing/accounts/{customer.account_id}", json={"failed_task_policy": "cost"}
        )
        assert changed.status_code == 200, changed.text
    second = customer.quoted_task()
    customer.agent_step(second["id"])
    cost = sum(r["cost_usd"] for r in ledger_rows(db, customer.account_id, 2, second["id"]))
    assert fail(second["id"]) == "cost"

    invoice = customer.invoice()
    task_lines = lines(invoice, "task")
    assert [(x["quantity"], Decimal(x["amount_exact_usd"])) for x in task_lines] == [(1, cost)]
    with meterline.admin() as admin:
        margin = admin.get(
            "/billing/reports/margin",
            params={"period": invoice["period"], "account_id": str(customer.account_id)},
        ).json()
    assert (margin["total"]["tasks"], margin["total"]["failed"]) == (2, 2)
    assert Decimal(margin["total"]["revenue_usd"]) == exact_sum(invoice, "task") == cost


def test_a_quoted_task_left_open_expires_and_the_proxy_refuses_it(
    database_url: str, upstream: Upstream, tmp_path: Path
) -> None:
    with start_meterline(
        database_url,
        upstream,
        tmp_path,
        METERLINE_TASK_EXPIRY_S="2",
        METERLINE_TASK_EXPIRY_INTERVAL_S="0.2",
    ) as server:
        customer = Customer(server)
        task = customer.quoted_task()
        assert task["expires_at"] is not None
        customer.agent_step(task["id"])
        deadline = time.monotonic() + 15
        while customer.api.get(f"/billing/tasks/{task['id']}").json()["status"] == "open":
            assert time.monotonic() < deadline, "the task never expired"
            time.sleep(0.2)
        expired = customer.api.get(f"/billing/tasks/{task['id']}").json()
        assert (expired["status"], expired["billed_as"]) == ("expired", "fixed_price")
        assert expired["completed_at"] == expired["expires_at"]
        with pytest.raises(openai.ConflictError) as refused:
            customer.agent_step(task["id"])
        assert refused.value.code == "task_completed"
        task_lines = lines(customer.invoice(), "task")
        assert [(x["quantity"], x["amount_usd"]) for x in task_lines] == [
            (1, task["fixed_price_usd"])
        ]


# -- the monthly export against the invoices -----------------------------------------------


def export(billing: Billing, period: BillingPeriod) -> list[dict[str, str]]:
    response = billing.admin.get("/billing/reports/monthly", params={"period": str(period)})
    assert response.status_code == 200, response.text
    return [r for r in csv.DictReader(io.StringIO(response.text)) if r["row_type"] == "line"]


def billed(rows: list[dict[str, str]], account: uuid.UUID) -> Decimal:
    return sum(
        (Decimal(r["billed_usd"]) for r in rows if r["account_id"] == str(account)), Decimal(0)
    )


def test_the_export_bills_what_the_months_invoices_bill(billing: Billing) -> None:
    period = month(-28)
    before = period.previous()
    model = unique("export/")
    price = billing.price(model, "1", "2", before.start, cached="0.1")
    unpriced = unique("exportlater/")
    at = period.start + timedelta(days=5)
    a, b, c = billing.account(), billing.account(), billing.account()

    # a: usage with more cached tokens than prompt tokens, a row priced only later by a
    # backdated price, an adjustment, a task used last month and completed this month, a
    # task with a request before its acceptance, a failed task billed at cost.
    billing.insert(
        Row(a, model, at, 1000, 200, cached=5000, price=price),
        Row(a, model, at, 30_000, 1000, price=price),
        Row(a, unpriced, at, 70_000, 0),
    )
    insert_usage(billing.db, adjustment(a, at, model, "-0.01"))
    _quoted_task(
        billing, a, "used-before", "succeeded", at, "0.75", model, accepted_at=before.start
    )
    accepted = period.start + timedelta(days=10)
    _quoted_task(
        billing,
        a,
        "early",
        "succeeded",
        accepted + timedelta(days=1),
        "0.40",
        model,
        accepted_at=accepted,
    )
    _quoted_task(
        billing,
        a,
        "broke",
        "failed",
        at + timedelta(days=1),
        "3.00",
        model,
        accepted_at=period.start,
        billed_as="cost",
    )
    billing.insert(
        Row(
            a,
            model,
            before.start + timedelta(days=3),
            50_000,
            500,
            price=price,
            task_id="used-before",
        ),
        Row(a, model, accepted - timedelta(hours=1), 20_000, 0, price=price, task_id="early"),
        Row(a, model, accepted + timedelta(hours=1), 20_000, 0, price=price, task_id="early"),
        Row(a, model, at, 40_000, 100, price=price, task_id="broke"),
        Row(a, unpriced, at, 10_000, 0, task_id="broke"),
    )
    # b: no usage this month, only a task completed in it; c: nothing at all.
    _quoted_task(billing, b, "b-job", "succeeded", at, "1.25", model, accepted_at=before.start)
    billing.insert(
        Row(b, model, before.start + timedelta(days=1), 1000, 0, price=price, task_id="b-job")
    )
    billing.price(unpriced, "3", "3", before.start)  # backdated: prices the stored rows

    finals = {x: billing.finalize(billing.generate(x, period)["id"]) for x in (a, b, c)}
    rows = export(billing, period)
    for account, invoice in finals.items():
        assert billed(rows, account) == Decimal(invoice["total_exact_usd"]), account
        listed = {r["invoice_number"] for r in rows if r["account_id"] == str(account)}
        assert listed == {invoice["number"]}
    assert Decimal(finals[a]["total_exact_usd"]) > 0 and finals[c]["lines"] == []
    (a_tokens,) = [
        r
        for r in rows
        if r["account_id"] == str(a) and (r["kind"], r["model"]) == ("tokens", model)
    ]
    assert int(a_tokens["cached_tokens"]) == lines(finals[a], "tokens")[0]["cached_tokens"] == 1000
    assert all(r["unpriced_requests"] == "0" for r in rows if r["account_id"] == str(a))

    # Documented exception: a row of the month recorded after its invoice was finalized is
    # in the month's export, and billed as late usage on the next invoice.
    late = Row(a, model, at, 12_345, 0, price=price)
    billing.insert(late)
    assert billed(export(billing, period), a) == Decimal(
        finals[a]["total_exact_usd"]
    ) + late.cost_at(price)
    assert exact_sum(billing.generate(a, period.next()), "late_usage") == late.cost_at(price)
