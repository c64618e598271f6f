"""Prepaid credits as a customer meets them: a balance that a hundred requests at once never
overdraw (one worker, or two sharing Redis), refusals as 402 `insufficient_credits`, grants
drawn in their documented order with an expiry in the middle of a run, and the pro tier
reached by a $5 purchase."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from pricing.credits import Credit, Movement, allocate, bounds
from tests.conftest import Meterline, Upstream, start_meterline
from tests.reliability import (
    REAL_TIERS,
    add_price,
    admin,
    burst,
    meterline_settings,
    new_customer,
    own_database,
    redis_available,
    redis_namespace,
    wait_for_rows,
)
from tests.support import Database
from tests.usage_rows import insert_usage, usage_row

# $400 per million tokens: a request's worst case (26 tokens) is about a cent.
MODEL = "meta-llama/credit-test"
PRICE = Decimal(400)
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say something"}]
MAX_TOKENS = 16
WORST_CASE = (4 + 1 + 2 + 3 + MAX_TOKENS) * PRICE / 1_000_000
CREDIT = Decimal("0.10")
SLOW = {"mock": {"delay_ms": 300}}


@pytest.fixture(scope="module")
def database(postgres_server: str, template_database: str) -> Iterator[str]:
    with own_database(postgres_server, template_database) as url:
        add_price(Database(url), MODEL, PRICE)
        yield url


def _cost(db: Database, account_id: uuid.UUID) -> Decimal:
    return Decimal(
        db.fetchval(
            "SELECT COALESCE(SUM(cost_usd), 0) FROM usage_ledger WHERE account_id = $1",
            account_id,
        )
    )


def _add_credit(url: str, account_id: uuid.UUID, **grant: Any) -> dict[str, Any]:
    with admin(url) as client:
        answer = client.post(f"/billing/accounts/{account_id}/credits", json=grant)
        assert answer.status_code == 201, answer.text
        created: dict[str, Any] = answer.json()
        return created


def _balance(url: str, account_id: uuid.UUID) -> dict[str, Any]:
    with admin(url) as client:
        answer = client.get(f"/billing/accounts/{account_id}/balance")
        assert answer.status_code == 200, answer.text
        found: dict[str, Any] = answer.json()
        return found


# -- the allocation itself ----------------------------------------------------------------

T0 = datetime(2026, 12, 1, tzinfo=UTC)


def _at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_grants_are_drawn_by_priority_then_expiry_then_age_and_lapse_at_expiry() -> None:
    first = Credit(uuid.uuid4(), Decimal("1.00"), _at(0), priority=2)  # last: lowest priority
    soon = Credit(uuid.uuid4(), Decimal("0.30"), _at(0), expires_at=_at(100))
    later = Credit(uuid.uuid4(), Decimal("0.50"), _at(10), expires_at=_at(200))
    never = Credit(uuid.uuid4(), Decimal("0.40"), _at(5))
    credits = [first, soon, later, never]
    cuts = bounds(credits, _at(300))
    assert cuts == [_at(0), _at(5), _at(10), _at(100), _at(200), _at(300)]
    # 0.10 before `later` exists, 0.25 until `soon` expires, 0.60 until `later` does, 0.70.
    usage = [Decimal("0.06"), Decimal("0.04"), Decimal("0.25"), Decimal("0.60"), Decimal("0.70")]
    allocation = allocate(credits, cuts, usage)
    # soon pays 0.06 + 0.04 + 0.20 (full), later 0.05 then 0.45 (full at 0.50) and the rest of
    # the fourth span goes to never (0.15); the last span: never's 0.25 left, first 0.45.
    assert allocation.consumed == {
        soon.id: Decimal("0.30"),
        later.id: Decimal("0.50"),
        never.id: Decimal("0.40"),
        first.id: Decimal("0.45"),
    }
    assert allocation.remaining[first.id] == Decimal("0.55")
    assert allocation.uncovered == 0
    assert allocation.available(credits, _at(300)) == Decimal("0.55")


def test_credit_left_at_expiry_is_lost_at_that_instant_exactly() -> None:
    expiring = Credit(uuid.uuid4(), Decimal("0.30"), _at(0), expires_at=_at(60))
    backup = Credit(uuid.uuid4(), Decimal("0.05"), _at(0), priority=5)
    cuts = bounds([expiring, backup], _at(120))
    allocation = allocate([expiring, backup], cuts, [Decimal("0.10"), Decimal("0.08")])
    assert allocation.lapsed[expiring.id] == Decimal("0.20")
    assert allocation.remaining == {expiring.id: 0, backup.id: 0}
    assert allocation.uncovered == Decimal("0.03")  # after the expiry only 0.05 remained
    kinds = [(m.kind, m.amount) for m in allocation.movements]
    assert (Movement.EXPIRY, Decimal("0.20")) in kinds
    assert expiring.active(_at(59.999)) and not expiring.active(_at(60))


# -- a hundred at once --------------------------------------------------------------------


def _hundred_against_ten_cents(url: str, db: Database, label: str) -> None:
    account_id, _, key = new_customer(url, billing_mode="prepaid")
    _add_credit(url, account_id, amount_usd=str(CREDIT), kind="grant")
    results = asyncio.run(
        burst(
            f"{url}/v1",
            key,
            100,
            model=MODEL,
            messages=MESSAGES,
            max_tokens=MAX_TOKENS,
            extra_body=SLOW,
        )
    )
    served = [r for r in results if not isinstance(r, openai.APIStatusError)]
    refused = [r for r in results if isinstance(r, openai.APIStatusError)]
    wait_for_rows(
        db,
        "SELECT count(*) FROM usage_ledger WHERE account_id = $1",
        account_id,
        count=len(served),
    )
    cost = _cost(db, account_id)
    print(f"\n[{label}] credit={CREDIT} served={len(served)} refused={len(refused)} cost={cost}")
    assert int(CREDIT / WORST_CASE) <= len(served) < 100
    assert cost <= CREDIT
    for error in refused:
        assert error.status_code == 402
        body: Any = error.body
        assert body["code"] == "insufficient_credits"
        assert f"Prepaid account {account_id}" in body["message"]
        assert "balance" in body["message"]
        assert error.response.headers["x-should-retry"] == "false"
    # Once everything settled, the balance is the credit less the ledger's cost, exactly.
    deadline = time.monotonic() + 10
    while True:
        found = _balance(url, account_id)
        if Decimal(found["reserved_usd"]) == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert Decimal(found["balance_usd"]) == CREDIT - cost
    assert Decimal(found["reserved_usd"]) == 0
    assert Decimal(found["available_usd"]) == CREDIT - cost
    assert Decimal(found["grants"][0]["remaining_usd"]) == CREDIT - cost


def test_a_hundred_requests_against_ten_cents_of_credit_in_process(
    database: str, upstream: Upstream, tmp_path: Path
) -> None:
    with start_meterline(database, upstream, tmp_path, **meterline_settings()) as m:
        _hundred_against_ten_cents(m.url, Database(database), "in process, 1 worker")


@pytest.mark.skipif(not redis_available(), reason="no Redis at 127.0.0.1:6379")
def test_a_hundred_requests_against_ten_cents_across_two_workers_sharing_redis(
    database: str, upstream: Upstream, tmp_path: Path
) -> None:
    with (
        redis_namespace() as shared,
        start_meterline(
            database, upstream, tmp_path, "--workers", "2", **meterline_settings(), **shared
        ) as m,
    ):
        _hundred_against_ten_cents(m.url, Database(database), "Redis, 2 workers")


# -- order and expiry, through the proxy ---------------------------------------------------


def _cents(amount: Decimal) -> Decimal:
    return amount.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)


def test_grants_consumed_in_order_with_an_expiry_in_the_middle_of_a_run(
    database: str, upstream: Upstream, tmp_path: Path
) -> None:
    db = Database(database)
    with start_meterline(database, upstream, tmp_path, **meterline_settings()) as m:
        account_id, _, key = new_customer(m.url, billing_mode="prepaid")
        expires = datetime.now(UTC) + timedelta(seconds=15)
        # Drawn first (priority 0) until it expires; then `soon` (earlier expiry) before
        # `never`, though `never` is older.
        never = _add_credit(m.url, account_id, amount_usd="0.05", kind="grant")
        first = _add_credit(
            m.url,
            account_id,
            amount_usd="0.04",
            kind="grant",
            priority=0,
            expires_at=expires.isoformat(),
        )
        soon = _add_credit(
            m.url,
            account_id,
            amount_usd="0.03",
            kind="purchase",
            expires_at=(expires + timedelta(days=30)).isoformat(),
        )
        client = openai.OpenAI(base_url=m.v1, api_key=key, max_retries=0)
        served = 2  # about 0.02 of `first`'s 0.04: the rest lapses at its expiry
        for _ in range(served):
            client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS)
        assert datetime.now(UTC) < expires
        time.sleep(max((expires - datetime.now(UTC)).total_seconds(), 0) + 0.2)
        after = 0
        while True:
            try:
                client.chat.completions.create(
                    model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS
                )
            except openai.APIStatusError as error:
                assert error.status_code == 402
                break
            after += 1
        wait_for_rows(
            db,
            "SELECT count(*) FROM usage_ledger WHERE account_id = $1",
            account_id,
            count=served + after,
        )
        balance = _balance(m.url, account_id)
    rows = db.fetch(
        "SELECT occurred_at, cost_usd FROM usage_ledger WHERE account_id = $1",
        account_id,
    )
    before_cost = sum((r["cost_usd"] for r in rows if r["occurred_at"] < expires), Decimal(0))
    after_cost = sum((r["cost_usd"] for r in rows if r["occurred_at"] >= expires), Decimal(0))
    print(f"\n[expiry] before={served} {before_cost} after={after} {after_cost}")
    assert served > 0 and after > 0
    # Row by row: `first` pays everything before its expiry while it can, then `soon`.
    first_paid = min(before_cost, Decimal("0.04"))
    spill = before_cost - first_paid
    soon_left = Decimal("0.03") - min(spill + after_cost, Decimal("0.03"))
    never_left = Decimal("0.05") - max(spill + after_cost - Decimal("0.03"), Decimal(0))
    # Credit was used up to what cannot pay one more request: drawing from `first` before its
    # expiry was not counted against the others again.
    assert soon_left + never_left < WORST_CASE
    grants = {g["id"]: g for g in balance["grants"]}
    assert [g["id"] for g in balance["grants"]] == [first["id"], soon["id"], never["id"]]
    assert grants[first["id"]]["status"] == "expired"
    assert Decimal(grants[first["id"]]["remaining_usd"]) == 0
    assert Decimal(grants[soon["id"]]["remaining_usd"]) == soon_left
    assert Decimal(grants[never["id"]]["remaining_usd"]) == never_left
    assert _cents(Decimal(balance["balance_usd"])) == _cents(soon_left + never_left)
    assert Decimal(balance["balance_usd"]) == soon_left + never_left
    # What `first` still held lapsed at its expiry, never drawn after it.
    assert Decimal(balance["balance_usd"]) >= 0


# -- the pro tier by deposit ----------------------------------------------------------------


def test_a_five_dollar_purchase_moves_basic_to_pro_and_lifts_its_rate_limit(
    database: str, upstream: Upstream, tmp_path: Path
) -> None:
    settings = meterline_settings(**REAL_TIERS)
    with start_meterline(database, upstream, tmp_path, **settings) as m:
        account_id, _, key = new_customer(m.url, billing_mode="prepaid")
        _add_credit(m.url, account_id, amount_usd="1", kind="grant")
        client = openai.OpenAI(base_url=m.v1, api_key=key, max_retries=0)
        for _ in range(60):
            client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1)
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1)
        # A granted $5 is not a deposit; a purchase that brings the bought total to $5 is.
        _add_credit(m.url, account_id, amount_usd="5", kind="grant")
        _add_credit(m.url, account_id, amount_usd="2", kind="purchase")
        with admin(m.url) as api:
            assert api.get(f"/billing/accounts/{account_id}").json()["tier"] == "basic"
        _add_credit(m.url, account_id, amount_usd="3", kind="purchase")
        with admin(m.url) as api:
            assert api.get(f"/billing/accounts/{account_id}").json()["tier"] == "pro"
            changes = api.get(f"/billing/accounts/{account_id}/tier-changes").json()["data"]
        assert [(c["from_tier"], c["to_tier"], c["reason"]) for c in changes] == [
            ("basic", "pro", "deposit")
        ]
        time.sleep(0.5)  # the key directory reloads on the change's notification
        answer = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1)
        assert answer.choices


# -- the billing API ----------------------------------------------------------------------


def test_balance_transactions_and_void_through_the_api(meterline: Meterline) -> None:
    db = Database(meterline.database_url)
    account_id, key = meterline.customer(name="credits api", billing_mode="prepaid")
    other_id, _ = meterline.customer(name="someone else")
    big = _add_credit(
        meterline.url, account_id, amount_usd="2.5", kind="purchase", reference="pay_1"
    )
    small = _add_credit(meterline.url, account_id, amount_usd="0.75", kind="grant", priority=0)
    assert big["remaining_usd"] == "2.500000000000" and big["status"] == "active"
    with meterline.admin() as api:  # the same purchase sent twice is one grant
        twice = [
            api.post(
                f"/billing/accounts/{other_id}/credits",
                json={"amount_usd": "0.01", "kind": "grant", "priority": 9},
                headers={"Idempotency-Key": "credit-once"},
            )
            for _ in range(2)
        ]
        assert [t.status_code for t in twice] == [201, 201]
        assert twice[0].json()["id"] == twice[1].json()["id"]
        api.delete(f"/billing/credits/{twice[0].json()['id']}").raise_for_status()
    # Usage after both grants: 0.9 is drawn from `small` (priority 0) then `big`.
    insert_usage(
        db,
        usage_row(account_id, datetime.now(UTC), cost="0.4"),
        usage_row(account_id, datetime.now(UTC), cost="0.5"),
    )
    with httpx.Client(base_url=meterline.url, headers={"Authorization": f"Bearer {key}"}) as own:
        found = own.get(f"/billing/accounts/{account_id}/balance").raise_for_status().json()
        assert own.get(f"/billing/accounts/{other_id}/balance").status_code == 404
        assert (
            own.post(
                f"/billing/accounts/{account_id}/credits", json={"amount_usd": "1", "kind": "grant"}
            ).status_code
            == 404
        )  # admin routes do not exist for a customer key
        assert own.delete(f"/billing/credits/{big['id']}").status_code == 404
    assert found["billing_mode"] == "prepaid"
    assert Decimal(found["balance_usd"]) == Decimal("2.35")
    assert [(g["id"], Decimal(g["remaining_usd"])) for g in found["grants"]] == [
        (small["id"], Decimal(0)),
        (big["id"], Decimal("2.35")),
    ]
    with meterline.admin() as api:
        voided = api.delete(f"/billing/credits/{big['id']}")
        assert voided.status_code == 200, voided.text
        assert voided.json()["status"] == "voided"
        assert api.delete(f"/billing/credits/{big['id']}").status_code == 409
        assert api.delete(f"/billing/credits/{uuid.uuid4()}").status_code == 404
        after = api.get(f"/billing/accounts/{account_id}/balance").json()
        assert Decimal(after["balance_usd"]) == 0
        # Every page of the transactions, one at a time.
        items: list[dict[str, Any]] = []
        params: dict[str, Any] = {"limit": 1}
        while True:
            page = api.get(
                f"/billing/accounts/{account_id}/credit-transactions", params=params
            ).json()
            items += page["data"]
            if not page["has_more"]:
                break
            params["cursor"] = page["next_cursor"]
        bad = api.get(f"/billing/accounts/{account_id}/credit-transactions", params={"cursor": "x"})
        assert bad.status_code == 422
        for wrong in (
            {"amount_usd": "0", "kind": "grant"},
            {"amount_usd": "-1", "kind": "grant"},
            {"amount_usd": "1", "kind": "gift"},
            {"amount_usd": 1.5, "kind": "grant", "priority": -1},
        ):
            refused = api.post(f"/billing/accounts/{account_id}/credits", json=wrong)
            assert refused.status_code == 422, wrong
        missing = api.post(
            f"/billing/accounts/{uuid.uuid4()}/credits", json={"amount_usd": "1", "kind": "grant"}
        )
        assert missing.status_code == 404
        assert api.get(f"/billing/accounts/{other_id}/balance").json()["billing_mode"] == "postpaid"
    summary = [(t["kind"], t["grant_id"], Decimal(t["amount_usd"])) for t in items]
    assert summary[:2] == [
        ("grant", big["id"], Decimal("2.5")),
        ("grant", small["id"], Decimal("0.75")),
    ]
    assert sorted(summary[2:]) == sorted(
        [
            ("drawdown", small["id"], Decimal("-0.75")),
            ("drawdown", big["id"], Decimal("-0.15")),
            ("void", big["id"], Decimal("-2.35")),
        ]
    )
    assert sum(amount for *_, amount in summary) == 0


def test_a_prepaid_invoice_shows_the_credit_applied_and_bills_the_rest(
    meterline: Meterline,
) -> None:
    db = Database(meterline.database_url)
    account_id, _ = meterline.customer(name="credits invoice", billing_mode="prepaid")
    _add_credit(meterline.url, account_id, amount_usd="0.333333", kind="purchase")
    now = datetime.now(UTC)
    insert_usage(
        db,
        usage_row(account_id, now, cost="0.4000004"),
        usage_row(account_id, now, cost="0.3"),
    )
    with meterline.admin() as api:
        created = api.post(
            "/billing/invoices", json={"account_id": str(account_id), "period": f"{now:%Y-%m}"}
        )
        assert created.status_code == 201, created.text
        invoice = created.json()
    lines = {line["kind"]: line for line in invoice["lines"]}
    assert lines["credits_applied"]["amount_exact_usd"].startswith("-0.333333")
    assert Decimal(lines["credits_applied"]["amount_usd"]) == Decimal("-0.33")
    assert invoice["lines"][-1]["kind"] == "credits_applied"
    usage = sum(Decimal(line["amount_usd"]) for line in invoice["lines"][:-1])
    assert usage == Decimal("0.70")
    assert Decimal(invoice["total_usd"]) == Decimal("0.37")


def _invoice(api: httpx.Client, account_id: uuid.UUID, period: str) -> dict[str, Any]:
    created = api.post("/billing/invoices", json={"account_id": str(account_id), "period": period})
    assert created.status_code == 201, created.text
    final = api.post(f"/billing/invoices/{created.json()['id']}/finalize")
    assert final.status_code == 200, final.text
    invoice: dict[str, Any] = final.json()
    return invoice


def _applied(invoice: dict[str, Any]) -> Decimal:
    return -sum(
        (
            Decimal(x["amount_exact_usd"])
            for x in invoice["lines"]
            if x["kind"] == "credits_applied"
        ),
        Decimal(0),
    )


@pytest.mark.parametrize(
    ("credit", "late_applied", "due"),
    [
        # Enough credit: the late row is paid by it, on the invoice that bills it.
        (Decimal("1.00"), Decimal("0.30"), Decimal("0.00")),
        # Forty cents: the first invoice took thirty, the late row the other ten (drawn in
        # time order, before the later month's usage); the rest is due.
        (Decimal("0.40"), Decimal("0.10"), Decimal("0.20")),
    ],
)
def test_credit_that_paid_a_late_row_is_applied_on_the_invoice_that_bills_it(
    meterline: Meterline, credit: Decimal, late_applied: Decimal, due: Decimal
) -> None:
    db = Database(meterline.database_url)
    account_id, _ = meterline.customer(name="credits late", billing_mode="prepaid")
    now = datetime.now(UTC)
    # Two months that are over: invoices of both can be finalized.
    this_month = (datetime(now.year, now.month, 1, tzinfo=UTC) - timedelta(days=1)).replace(day=1)
    last_month = (this_month - timedelta(days=1)).replace(day=1)
    # A grant bought at the start of the earlier month (the API dates a grant now).
    db.execute(
        "INSERT INTO credit_grants (account_id, kind, amount_usd, created_at)"
        " VALUES ($1, 'purchase', $2, $3)",
        account_id,
        credit,
        last_month,
    )
    insert_usage(db, usage_row(account_id, last_month + timedelta(days=3), cost="0.30"))
    with meterline.admin() as api:
        first = _invoice(api, account_id, f"{last_month:%Y-%m}")
        assert _applied(first) == Decimal("0.30") and Decimal(first["total_usd"]) == 0
        # A row of the earlier month recorded after its invoice (replayed from a spool), and
        # the later month's usage: both on the later month's invoice.
        insert_usage(
            db,
            usage_row(account_id, last_month + timedelta(days=20), cost="0.20"),
            usage_row(account_id, this_month, cost="0.10"),
        )
        second = _invoice(api, account_id, f"{this_month:%Y-%m}")
        balance = api.get(f"/billing/accounts/{account_id}/balance").json()
    assert [x["kind"] for x in second["lines"]] == ["tokens", "late_usage", "credits_applied"]
    assert _applied(second) == late_applied
    assert Decimal(second["total_usd"]) == due
    # What the invoices applied is what the credit paid: no cent paid twice, none left out.
    drawn = credit - Decimal(balance["balance_usd"])
    assert _applied(first) + _applied(second) == drawn
    assert Decimal(balance["uncovered_usd"]) == due


def test_a_quote_accepted_on_a_prepaid_account_holds_its_price_against_the_credit(
    meterline: Meterline,
) -> None:
    account_id, _ = meterline.customer(name="credits quote", billing_mode="prepaid")

    def quote(api: httpx.Client) -> dict[str, Any]:
        answer = api.post(
            "/billing/quotes",
            json={
                "account_id": str(account_id),
                "task_type": "credits",
                "model": "meta-llama/Llama-3.3-70B-Instruct",  # a default price
                "prompt_tokens": 1000,
                "max_completion_tokens": 1000,
            },
        )
        assert answer.status_code == 201, answer.text
        found: dict[str, Any] = answer.json()
        return found

    with meterline.admin() as api:
        price = Decimal(quote(api)["price_usd"])
        assert price > 0
        _add_credit(meterline.url, account_id, amount_usd=str(price * 3 / 2), kind="grant")
        first = api.post(f"/billing/quotes/{quote(api)['id']}/accept", json={"task_id": "c1"})
        assert first.status_code == 201, first.text
        # Half a price is left: the second cannot be accepted, and opens no task.
        second = api.post(f"/billing/quotes/{quote(api)['id']}/accept", json={"task_id": "c2"})
        assert second.status_code == 402, second.text
        assert second.json()["error"]["code"] == "insufficient_credits"
        assert (
            api.get("/billing/tasks/c2", params={"account_id": str(account_id)}).status_code == 404
        )
        balance = api.get(f"/billing/accounts/{account_id}/balance").json()
    # The open task's fixed price is drawn from the credit.
    assert Decimal(balance["balance_usd"]) == price / 2
