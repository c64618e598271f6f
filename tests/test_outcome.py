"""Outcome-based billing end to end: the `openai` SDK through `meterline serve`.

quote → accept → an agent's tool-calling requests carrying `X-Task-Id` → complete → invoice.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import Meterline
from tests.support import Database
from tests.usage_rows import insert_usage, usage_row

PRICED = "meta-llama/Llama-3.3-70B-Instruct"  # $0.40 / M tokens in and out
DEAR = "deepseek-ai/DeepSeek-R1-0528"  # $3.00 / M tokens in and out
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "search",
            "description": "Search the knowledge base.",
            "parameters": {
                "type": "object",
                "properties": {"query": {"type": "string"}},
                "required": ["query"],
            },
        },
    }
]


class Customer:
    def __init__(self, meterline: Meterline, **account: object) -> None:
        created = meterline.new_account(**account)
        self.account_id = uuid.UUID(str(created["id"]))
        self.key = meterline.new_key(created["id"])
        self.meterline = meterline
        self.api = httpx.Client(
            base_url=meterline.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=30
        )
        self.openai = openai.OpenAI(base_url=meterline.v1, api_key=self.key, max_retries=0)

    def quoted_task(self, model: str = PRICED, **quote: object) -> dict[str, Any]:
        body = {"task_type": "research", "model": model, **quote}
        body.setdefault("prompt_tokens", 2_000)
        body.setdefault("max_completion_tokens", 1_000)
        created = self.api.post("/billing/quotes", json=body)
        assert created.status_code == 201, created.text
        accepted = self.api.post(f"/billing/quotes/{created.json()['id']}/accept")
        assert accepted.status_code == 201, accepted.text
        task: dict[str, Any] = accepted.json()
        return task

    def agent_step(self, task_id: str | None, prompt: str = "Find the answer") -> Any:
        """One tool-calling round trip of an agent: the model calls a tool, gets its result."""
        headers = {"X-Task-Id": task_id, "X-Task-Type": "research"} if task_id else {}
        messages: list[Any] = [{"role": "user", "content": prompt}]
        call = self.openai.chat.completions.create(
            model=PRICED, messages=messages, tools=TOOLS, extra_headers=headers
        )
        tool_calls = call.choices[0].message.tool_calls
        assert tool_calls, "the model was expected to call the tool"
        tool_call = tool_calls[0]
        messages += [
            call.choices[0].message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": tool_call.id, "content": "42"},
        ]
        return self.openai.chat.completions.create(
            model=PRICED, messages=messages, tools=TOOLS, tool_choice="none", extra_headers=headers
        )

    def complete(self, task_id: str, outcome: str) -> dict[str, Any]:
        """The operator reports the task's outcome (the default: customers may not)."""
        with self.meterline.admin() as admin:
            response = admin.post(
                f"/billing/tasks/{task_id}/complete",
                params={"account_id": str(self.account_id)},
                json={"outcome": outcome},
            )
        assert response.status_code == 200, response.text
        task: dict[str, Any] = response.json()
        return task

    def invoice(self) -> dict[str, Any]:
        period = datetime.now(UTC).strftime("%Y-%m")
        with self.meterline.admin() as admin:
            response = admin.post(
                "/billing/invoices", json={"account_id": str(self.account_id), "period": period}
            )
        assert response.status_code in (200, 201), response.text
        invoice: dict[str, Any] = response.json()
        return invoice


def ledger_rows(
    db: Database, account_id: uuid.UUID, count: int, task_id: str | None = None
) -> list[dict[str, Any]]:
    """The account's ledger rows once `count` have landed (the writer flushes every 50 ms)."""
    deadline = time.monotonic() + 10
    while True:
        rows = db.fetch(
            "SELECT * FROM usage_ledger WHERE account_id = $1"
            " AND ($2::text IS NULL OR task_id = $2)",
            account_id,
            task_id,
        )
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


def test_a_succeeded_quoted_task_is_billed_its_fixed_price_not_its_tokens(
    meterline: Meterline, db: Database
) -> None:
    customer = Customer(meterline)
    task = customer.quoted_task()
    price = Decimal(task["fixed_price_usd"])
    # 2,000 + 1,000 tokens at $0.40/M = $0.0012, + 20 % → rounded up to $0.01.
    assert price == Decimal("0.01")
    for step in range(3):
        customer.agent_step(task["id"], prompt=f"step {step}")
    customer.agent_step(None, prompt="a request outside any task")
    rows = ledger_rows(db, customer.account_id, 6, task["id"])
    assert len(rows) == 6 and all(r["status_code"] == 200 for r in rows)
    task_cost = sum(r["cost_usd"] for r in rows)
    task_tokens = sum(r["total_tokens"] for r in rows)
    outside = ledger_rows(db, customer.account_id, 8)
    outside = [r for r in outside if r["task_id"] is None]
    assert len(outside) == 2

    seen = customer.api.get(f"/billing/tasks/{task['id']}").json()
    assert seen["requests"] == 6 and seen["total_tokens"] == task_tokens
    assert Decimal(seen["cost_usd"]) == task_cost

    done = customer.complete(task["id"], "succeeded")
    assert done["status"] == "succeeded" and done["fixed_price_usd"] == "0.01"

    invoice = customer.invoice()
    task_lines = [line for line in invoice["lines"] if line["kind"] == "task"]
    token_lines = [line for line in invoice["lines"] if line["kind"] == "tokens"]
    assert len(task_lines) == 1
    assert task_lines[0]["quantity"] == 1
    assert Decimal(task_lines[0]["amount_usd"]) == price
    assert task_lines[0]["task_type"] == "research"
    # Only the request outside the task is billed per token.
    assert sum(line["prompt_tokens"] for line in token_lines) == sum(
        r["prompt_tokens"] for r in outside
    )
    assert sum(line["completion_tokens"] for line in token_lines) == sum(
        r["completion_tokens"] for r in outside
    )


def test_a_failed_quoted_task_is_free_by_default(meterline: Meterline, db: Database) -> None:
    customer = Customer(meterline)
    task = customer.quoted_task()
    customer.agent_step(task["id"])
    assert len(ledger_rows(db, customer.account_id, 2, task["id"])) == 2
    assert customer.complete(task["id"], "failed")["status"] == "failed"
    invoice = customer.invoice()
    assert [line for line in invoice["lines"] if line["kind"] in ("task", "tokens")] == []
    assert Decimal(invoice["total_usd"]) == 0


def test_a_failed_quoted_task_is_billed_at_cost_under_the_cost_policy(
    meterline: Meterline, db: Database
) -> None:
    customer = Customer(meterline, failed_task_policy="cost")
    task = customer.quoted_task(model=DEAR)
    # An expensive prompt on the dear model, so the cost shows in cents.
    customer.openai.chat.completions.create(
        model=DEAR,
        messages=[{"role": "user", "content": "tok " * 5000}],
        extra_headers={"X-Task-Id": task["id"]},
    )
    rows = ledger_rows(db, customer.account_id, 1, task["id"])
    customer.complete(task["id"], "failed")
    lines = [line for line in customer.invoice()["lines"] if line["kind"] == "task"]
    assert len(lines) == 1
    assert Decimal(lines[0]["amount_exact_usd"]) == sum(r["cost_usd"] for r in rows)


def test_a_request_on_a_completed_task_is_refused_and_not_billed(
    meterline: Meterline, db: Database
) -> None:
    customer = Customer(meterline)
    task = customer.quoted_task()
    customer.agent_step(task["id"])
    ledger_rows(db, customer.account_id, 2, task["id"])
    customer.complete(task["id"], "succeeded")

    with pytest.raises(openai.ConflictError) as refused:
        customer.agent_step(task["id"])
    assert refused.value.status_code == 409
    assert refused.value.code == "task_completed"
    assert refused.value.response.headers.get("x-should-retry") == "false"
    # The same holds for a task that was never quoted.
    customer.agent_step("plain-task")
    ledger_rows(db, customer.account_id, 2, "plain-task")
    customer.complete("plain-task", "succeeded")
    with pytest.raises(openai.ConflictError):
        customer.agent_step("plain-task")

    time.sleep(0.3)  # a refused request would have been flushed by now
    rows = ledger_rows(db, customer.account_id, 0)
    assert len([r for r in rows if r["task_id"] == task["id"]]) == 2
    assert len([r for r in rows if r["task_id"] == "plain-task"]) == 2
    invoice = customer.invoice()
    assert [line["kind"] for line in invoice["lines"] if line["kind"] == "task"] == ["task"]
    assert Decimal(invoice["total_usd"]) == Decimal(task["fixed_price_usd"]) + sum(
        Decimal(line["amount_usd"]) for line in invoice["lines"] if line["kind"] == "tokens"
    )


def test_the_cost_cap_stops_a_runaway_task(meterline: Meterline, db: Database) -> None:
    customer = Customer(meterline)
    # A tiny estimate: the price is one cent, so the cap (3 x) is three cents.
    task = customer.quoted_task(model=DEAR, prompt_tokens=1, max_completion_tokens=1)
    assert (task["fixed_price_usd"], Decimal(task["cost_cap_usd"])) == ("0.01", Decimal("0.03"))
    big_prompt: list[Any] = [{"role": "user", "content": "loop " * 4000}]  # ≈ $0.012 a request
    admitted = 0
    with pytest.raises(openai.APIStatusError) as stopped:
        for _ in range(10):
            customer.openai.chat.completions.create(
                model=DEAR, messages=big_prompt, extra_headers={"X-Task-Id": task["id"]}
            )
            admitted += 1
    assert stopped.value.status_code == 402
    assert stopped.value.code == "task_cost_cap_reached"
    rows = ledger_rows(db, customer.account_id, admitted, task["id"])
    per_request = rows[0]["cost_usd"]
    spent = sum(r["cost_usd"] for r in rows)
    # It ran until its cost reached the cap, and not a request further.
    assert admitted == 3
    assert spent >= Decimal("0.03") > spent - per_request
    seen = customer.api.get(f"/billing/tasks/{task['id']}").json()
    assert seen["requests"] == 3 and seen["status"] == "open"


def test_by_default_only_the_operator_reports_an_outcome(
    meterline: Meterline, db: Database
) -> None:
    customer = Customer(meterline)
    task = customer.quoted_task()
    customer.agent_step(task["id"])
    ledger_rows(db, customer.account_id, 2, task["id"])
    # "failed" is free by default: the customer must not be the one to decide it.
    for outcome in ("failed", "succeeded"):
        refused = customer.api.post(
            f"/billing/tasks/{task['id']}/complete", json={"outcome": outcome}
        )
        assert refused.status_code == 403, refused.text
        assert refused.json()["error"]["type"] == "permission_error"
    # Nothing changed: the task is open and still takes requests.
    assert customer.api.get(f"/billing/tasks/{task['id']}").json()["status"] == "open"
    customer.agent_step(task["id"])
    # Nor can the key give itself the right.
    patched = customer.api.patch(
        f"/billing/accounts/{customer.account_id}", json={"customer_reported_outcomes": True}
    )
    assert patched.status_code == 403
    assert customer.complete(task["id"], "succeeded")["status"] == "succeeded"
    [line] = [line for line in customer.invoice()["lines"] if line["kind"] == "task"]
    assert Decimal(line["amount_usd"]) == Decimal(task["fixed_price_usd"])


def test_an_account_may_let_its_customer_report_outcomes(meterline: Meterline) -> None:
    customer = Customer(meterline, customer_reported_outcomes=True)
    first, second = customer.quoted_task(), customer.quoted_task()
    done = customer.api.post(f"/billing/tasks/{first['id']}/complete", json={"outcome": "failed"})
    assert done.status_code == 200, done.text
    assert done.json()["status"] == "failed"
    # The operator takes the right back: from then on the key is refused again.
    with meterline.admin() as admin:
        patched = admin.patch(
            f"/billing/accounts/{customer.account_id}", json={"customer_reported_outcomes": False}
        )
        assert patched.json()["customer_reported_outcomes"] is False
    late = customer.api.post(f"/billing/tasks/{second['id']}/complete", json={"outcome": "failed"})
    assert late.status_code == 403


def test_a_quoted_task_takes_requests_for_its_quoted_model_only(
    meterline: Meterline, db: Database
) -> None:
    customer = Customer(meterline)
    task = customer.quoted_task()  # PRICED, $0.01, cap $0.03
    headers = {"X-Task-Id": task["id"]}
    messages: list[Any] = [{"role": "user", "content": "work"}]
    # The attack: an unpriced model under a $0.01 quote, which no cap could ever stop.
    refused = 0
    for model in ["unpriced/free-ride"] * 25 + [DEAR]:
        with pytest.raises(openai.ConflictError) as mismatch:
            customer.openai.chat.completions.create(
                model=model, messages=messages, extra_headers=headers
            )
        assert mismatch.value.code == "task_model_mismatch"
        assert mismatch.value.response.headers.get("x-should-retry") == "false"
        assert PRICED in mismatch.value.message
        refused += 1
    assert refused == 26
    # The quoted model works under the task; the other model works outside it.
    customer.openai.chat.completions.create(model=PRICED, messages=messages, extra_headers=headers)
    customer.openai.chat.completions.create(model="unpriced/free-ride", messages=messages)
    ledger_rows(db, customer.account_id, 2)
    time.sleep(0.3)  # a refused request would have been flushed by now
    rows = ledger_rows(db, customer.account_id, 2)
    assert sorted((r["requested_model"], r["task_id"]) for r in rows) == sorted(
        [(PRICED, task["id"]), ("unpriced/free-ride", None)]
    )


def test_usage_without_a_price_stops_a_quoted_task_at_its_cap(
    meterline: Meterline, db: Database
) -> None:
    customer = Customer(meterline)
    task = customer.quoted_task()
    customer.agent_step(task["id"])
    # A row another worker stored without a price (its price book had not loaded the
    # model's price yet): the task's cost can no longer be held to its cap.
    insert_usage(
        db, usage_row(customer.account_id, datetime.now(UTC), cost=None, task_id=task["id"])
    )
    deadline = time.monotonic() + 10  # the guard reloads every 2 s
    with pytest.raises(openai.APIStatusError) as stopped:
        while time.monotonic() < deadline:
            customer.agent_step(task["id"])
            time.sleep(0.2)
    assert stopped.value.status_code == 402
    assert stopped.value.code == "task_cost_cap_reached"
    assert "without a price" in stopped.value.message


def test_usage_from_before_the_acceptance_is_not_the_quoted_tasks(
    meterline: Meterline, db: Database
) -> None:
    customer = Customer(meterline)
    task, control = customer.quoted_task(), customer.quoted_task()
    accepted = datetime.fromisoformat(task["created_at"])
    customer.openai.chat.completions.create(
        model=PRICED,
        messages=[{"role": "user", "content": "hi"}],
        extra_headers={"X-Task-Id": task["id"]},
    )
    [covered] = ledger_rows(db, customer.account_id, 1, task["id"])
    # A request sent on the task id before the quote was accepted, reaching the ledger
    # late (from a spool): a dollar of ordinary usage, far past the task's $0.03 cap. The
    # control task gets the same dollar after its acceptance.
    insert_usage(
        db,
        usage_row(
            customer.account_id,
            accepted - timedelta(seconds=1),
            cost="1.00",
            model=PRICED,
            task_id=task["id"],
        ),
        usage_row(
            customer.account_id, datetime.now(UTC), cost="1.00", model=PRICED, task_id=control["id"]
        ),
    )
    deadline = time.monotonic() + 10  # the guard reloads every 2 s: wait until it has
    with pytest.raises(openai.APIStatusError) as capped:
        while time.monotonic() < deadline:
            customer.agent_step(control["id"])
            time.sleep(0.2)
    assert capped.value.code == "task_cost_cap_reached"
    # The same reload left the task under its cap: the early dollar is not its cost.
    customer.agent_step(task["id"])
    rows = ledger_rows(db, customer.account_id, 4, task["id"])
    seen = customer.api.get(f"/billing/tasks/{task['id']}").json()
    mine = [r for r in rows if r["occurred_at"] >= accepted]
    assert len(rows) == 4 and len(mine) == 3 and covered in mine
    assert seen["requests"] == 3
    assert Decimal(seen["cost_usd"]) == sum(r["cost_usd"] for r in mine) < Decimal("0.03")
