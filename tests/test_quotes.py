"""Quotes through the billing API: history quantiles, estimates, scoping, accepting."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import pytest

from pricing.quote import quantile
from tests.conftest import Meterline
from tests.support import Database

PRICED = "meta-llama/Llama-3.3-70B-Instruct"  # $0.40 / M tokens in and out (default prices)


async def _insert_tasks(dsn: str, rows: Sequence[tuple[Any, ...]]) -> None:
    connection = await asyncpg.connect(dsn)
    try:
        await connection.executemany(
            "INSERT INTO tasks (account_id, external_id, task_type, model, status, created_at,"
            " completed_at, completed_cost_usd) VALUES ($1, $2, $3, $4, $5, $6, $6, $7)",
            rows,
        )
    finally:
        await connection.close()


def completed_tasks(
    db: Database,
    account_id: uuid.UUID,
    task_type: str,
    model: str,
    costs: Sequence[Decimal],
    *,
    days_ago: tuple[float, float] = (0.01, 80),
    status: str = "succeeded",
) -> None:
    """Past tasks written straight into `tasks`, as completion leaves them."""
    now = datetime.now(UTC)
    rng = random.Random(len(costs))
    rows = [
        (
            account_id,
            f"hist_{uuid.uuid4().hex}",
            task_type,
            model,
            status,
            now - timedelta(days=rng.uniform(*days_ago)),
            cost,
        )
        for cost in costs
    ]
    asyncio.run(_insert_tasks(db.dsn, rows))


def lognormal_costs(n: int, seed: int) -> list[Decimal]:
    rng = random.Random(seed)
    return [Decimal(str(round(rng.lognormvariate(-4, 0.8), 9))) for _ in range(n)]


@pytest.fixture
def admin(meterline: Meterline) -> httpx.Client:
    return meterline.admin()


def quote(client: httpx.Client, **body: Any) -> httpx.Response:
    return client.post("/billing/quotes", json=body)


def test_history_quote_lands_on_the_requested_quantile(
    meterline: Meterline, admin: httpx.Client, db: Database
) -> None:
    account_id, _ = meterline.customer()
    costs = lognormal_costs(1000, seed=7)
    completed_tasks(db, account_id, "summarize", PRICED, costs)
    # Noise that must not count: too old, another type, another model, another account.
    completed_tasks(db, account_id, "summarize", PRICED, [Decimal(50)] * 40, days_ago=(92, 200))
    completed_tasks(db, account_id, "translate", PRICED, [Decimal(50)] * 40)
    completed_tasks(db, account_id, "summarize", "Qwen/QwQ-32B", [Decimal(50)] * 40)
    other, _ = meterline.customer()
    completed_tasks(db, other, "summarize", PRICED, [Decimal(50)] * 40)

    for confidence in ("0.9", "0.5", "0.99", "0.123"):
        response = quote(
            admin,
            account_id=str(account_id),
            task_type="summarize",
            model=PRICED,
            confidence=confidence,
        )
        assert response.status_code == 201, response.text
        body = response.json()
        assert body["basis"] == "history"
        assert body["sample_size"] == 1000
        expected_quantile = quantile(costs, Decimal(confidence))
        assert Decimal(body["quantile_cost_usd"]) == expected_quantile
        mean = sum(costs, Decimal(0)) / len(costs)
        assert abs(Decimal(body["expected_cost_usd"]) - mean) < Decimal("1e-11")
        # Default margin 20 %, rounded up to the cent.
        price = Decimal(body["price_usd"])
        assert (
            expected_quantile * Decimal("1.2")
            <= price
            < expected_quantile * Decimal("1.2") + (Decimal("0.01"))
        )
        assert Decimal(body["confidence"]) == Decimal(confidence)


def test_history_quantile_when_all_costs_share_one_bucket(
    meterline: Meterline, admin: httpx.Client, db: Database
) -> None:
    """Costs within a percent of each other: the walk inside one bucket still finds the rank."""
    account_id, _ = meterline.customer()
    costs = [Decimal("0.100000") + Decimal(i) / Decimal(10**8) for i in range(200)]
    random.Random(3).shuffle(costs)
    completed_tasks(db, account_id, "classify", PRICED, costs)
    body = quote(
        admin, account_id=str(account_id), task_type="classify", model=PRICED, confidence="0.9"
    ).json()
    assert body["basis"] == "history"
    assert Decimal(body["quantile_cost_usd"]) == quantile(costs, Decimal("0.9"))


def test_the_accounts_own_margin_applies(
    meterline: Meterline, admin: httpx.Client, db: Database
) -> None:
    account = meterline.new_account(quote_margin="0.5")
    account_id = uuid.UUID(str(account["id"]))
    completed_tasks(db, account_id, "summarize", PRICED, [Decimal("1.00")] * 30)
    body = quote(admin, account_id=str(account_id), task_type="summarize", model=PRICED).json()
    assert body["basis"] == "history" and body["sample_size"] == 30
    assert body["margin"] == "0.5000"
    assert body["price_usd"] == "1.50"


def test_too_little_history_falls_back_to_an_estimate(
    meterline: Meterline, admin: httpx.Client, db: Database
) -> None:
    account_id, _ = meterline.customer()
    completed_tasks(db, account_id, "summarize", PRICED, [Decimal(5)] * 29)
    response = quote(
        admin,
        account_id=str(account_id),
        task_type="summarize",
        model=PRICED,
        prompt_tokens=10_000,
        max_completion_tokens=2_500,
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["basis"] == "estimate"
    assert body["sample_size"] == 29
    # 12,500 tokens at $0.40/M = $0.005; + 20 % = $0.006 → rounded up to $0.01.
    assert Decimal(body["expected_cost_usd"]) == Decimal("0.005")
    assert body["price_usd"] == "0.01"
    assert datetime.fromisoformat(body["valid_until"]) > datetime.now(UTC) + timedelta(minutes=50)


def test_an_estimate_counts_the_messages_tokens(meterline: Meterline, admin: httpx.Client) -> None:
    account_id, _ = meterline.customer()
    messages = [{"role": "user", "content": "word " * 1000}]
    body = quote(
        admin,
        account_id=str(account_id),
        task_type="x",
        model=PRICED,
        messages=messages,
        max_completion_tokens=0,
    ).json()
    assert body["basis"] == "estimate"
    assert 1000 <= body["prompt_tokens"] <= 1010
    assert Decimal(body["expected_cost_usd"]) == body["prompt_tokens"] * Decimal("0.4") / 10**6


def test_an_estimate_without_its_inputs_is_a_clear_422(
    meterline: Meterline, admin: httpx.Client
) -> None:
    account_id, _ = meterline.customer()
    response = quote(admin, account_id=str(account_id), task_type="x", model=PRICED)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "quote_needs_estimate_inputs"
    assert "0 completed tasks" in error["message"] and "30 needed" in error["message"]


def test_a_model_without_price_cannot_be_quoted(meterline: Meterline, admin: httpx.Client) -> None:
    account_id, _ = meterline.customer()
    response = quote(
        admin,
        account_id=str(account_id),
        task_type="x",
        model="unpriced/model",
        prompt_tokens=10,
        max_completion_tokens=10,
    )
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "model_not_priced"


def test_a_customer_key_quotes_only_for_its_own_account(meterline: Meterline) -> None:
    account_id, key = meterline.customer()
    other, _ = meterline.customer()
    with httpx.Client(base_url=meterline.url, headers={"Authorization": f"Bearer {key}"}) as c:
        own = quote(c, task_type="x", model=PRICED, prompt_tokens=1, max_completion_tokens=1)
        assert own.status_code == 201
        assert own.json()["account_id"] == str(account_id)
        foreign = quote(
            c,
            account_id=str(other),
            task_type="x",
            model=PRICED,
            prompt_tokens=1,
            max_completion_tokens=1,
        )
        assert foreign.status_code == 404
    with meterline.admin() as admin:
        assert admin.get(f"/billing/quotes/{own.json()['id']}").status_code == 200
        missing = quote(admin, task_type="x", model=PRICED, prompt_tokens=1)
        assert missing.status_code == 422
        assert missing.json()["error"]["param"] == "body.account_id"


def test_accepting_opens_a_task_once(meterline: Meterline, db: Database) -> None:
    _, key = meterline.customer()
    with httpx.Client(base_url=meterline.url, headers={"Authorization": f"Bearer {key}"}) as c:
        q = quote(c, task_type="x", model=PRICED, prompt_tokens=10**6, max_completion_tokens=0)
        quote_id = q.json()["id"]
        accepted = c.post(f"/billing/quotes/{quote_id}/accept")
        assert accepted.status_code == 201, accepted.text
        task = accepted.json()
        assert task["id"].startswith("task_")
        assert task["status"] == "open" and task["quoted"] is True
        assert task["fixed_price_usd"] == "0.48"  # $0.40 + 20 %
        assert Decimal(task["cost_cap_usd"]) == Decimal("1.44")  # 3 x the price
        assert task["task_type"] == "x" and task["model"] == PRICED

        again = c.post(f"/billing/quotes/{quote_id}/accept")
        assert again.status_code == 409
        assert again.json()["error"]["code"] == "quote_already_accepted"
        assert c.get(f"/billing/quotes/{quote_id}").json()["task_id"] == task["id"]
        assert c.get(f"/billing/tasks/{task['id']}").json()["fixed_price_usd"] == "0.48"

        # A client-chosen id; the same id again (on another quote) is refused.
        mine = quote(c, task_type="x", model=PRICED, prompt_tokens=1, max_completion_tokens=1)
        chosen = c.post(f"/billing/quotes/{mine.json()['id']}/accept", json={"task_id": "job-1"})
        assert chosen.status_code == 201 and chosen.json()["id"] == "job-1"
        dup = quote(c, task_type="x", model=PRICED, prompt_tokens=1, max_completion_tokens=1)
        clash = c.post(f"/billing/quotes/{dup.json()['id']}/accept", json={"task_id": "job-1"})
        assert clash.status_code == 409
        assert clash.json()["error"]["code"] == "task_id_in_use"
        # The refused accept left the quote open.
        assert c.get(f"/billing/quotes/{dup.json()['id']}").json()["accepted_at"] is None


def test_an_expired_quote_cannot_be_accepted(meterline: Meterline, db: Database) -> None:
    _, key = meterline.customer()
    with httpx.Client(base_url=meterline.url, headers={"Authorization": f"Bearer {key}"}) as c:
        q = quote(c, task_type="x", model=PRICED, prompt_tokens=1, max_completion_tokens=1)
        db.execute(
            "UPDATE quotes SET valid_until = now() - interval '1 second' WHERE id = $1",
            uuid.UUID(q.json()["id"]),
        )
        response = c.post(f"/billing/quotes/{q.json()['id']}/accept")
        assert response.status_code == 410
        assert response.json()["error"]["code"] == "quote_expired"


def test_another_accounts_quote_does_not_exist(meterline: Meterline) -> None:
    _, key = meterline.customer()
    _, other_key = meterline.customer()
    with httpx.Client(base_url=meterline.url, headers={"Authorization": f"Bearer {key}"}) as c:
        q = quote(c, task_type="x", model=PRICED, prompt_tokens=1, max_completion_tokens=1)
    with httpx.Client(
        base_url=meterline.url, headers={"Authorization": f"Bearer {other_key}"}
    ) as c:
        assert c.get(f"/billing/quotes/{q.json()['id']}").status_code == 404
        assert c.post(f"/billing/quotes/{q.json()['id']}/accept").status_code == 404


def test_malformed_quote_bodies_are_clear_422s(meterline: Meterline, admin: httpx.Client) -> None:
    account_id, _ = meterline.customer()
    base = {"account_id": str(account_id), "model": PRICED, "max_completion_tokens": 1}
    for body in (
        {**base, "task_type": "a\x00b"},
        {**base, "task_type": "x", "messages": [{"role": "user", "tool_calls": 5}]},
        {**base, "task_type": "x", "prompt_tokens": 1, "confidence": "1"},
        {**base, "task_type": "x", "prompt_tokens": -1},
    ):
        response = admin.post("/billing/quotes", json=body)
        assert response.status_code == 422, (body, response.text)
    with meterline.admin() as client:
        far = client.get("/billing/reports/margin", params={"period": "0000-01"})
        assert far.status_code == 422
