"""Tasks through the billing API, with usage written straight into the ledger."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import httpx

from tests.conftest import Meterline
from tests.support import Database
from tests.usage_rows import insert_usage, usage_row


def customer_client(meterline: Meterline, key: str) -> httpx.Client:
    return httpx.Client(base_url=meterline.url, headers={"Authorization": f"Bearer {key}"})


def test_a_task_seen_only_in_the_ledger_reads_with_its_usage(
    meterline: Meterline, db: Database
) -> None:
    account_id, key = meterline.customer()
    now = datetime.now(UTC)
    insert_usage(
        db,
        usage_row(
            account_id,
            now,
            prompt=100,
            completion=20,
            cost="0.001",
            task_id="agent-1",
            task_type="research",
            model="m-a",
        ),
        usage_row(
            account_id,
            now,
            prompt=50,
            completion=10,
            cost="0.0005",
            task_id="agent-1",
            task_type="research",
            model="m-a",
        ),
        usage_row(
            account_id, now, prompt=7, completion=3, cost=None, task_id="agent-1", model="m-b"
        ),
        usage_row(account_id, now, prompt=1, completion=1, cost="9", task_id="other"),
    )
    with customer_client(meterline, key) as client:
        task = client.get("/billing/tasks/agent-1").json()
    assert task["status"] == "open" and task["quoted"] is False
    assert task["requests"] == 3
    assert (task["prompt_tokens"], task["completion_tokens"], task["total_tokens"]) == (
        157,
        33,
        190,
    )
    assert Decimal(task["cost_usd"]) == Decimal("0.0015")
    assert task["unpriced_requests"] == 1
    assert task["task_type"] == "research" and task["model"] == "m-a"


def test_tasks_are_scoped_to_their_account(meterline: Meterline, db: Database) -> None:
    account_id, _ = meterline.customer()
    # Even a key allowed to report its own account's outcomes finds no other account's task.
    _, other_key = meterline.customer(customer_reported_outcomes=True)
    insert_usage(db, usage_row(account_id, datetime.now(UTC), task_id="private"))
    with customer_client(meterline, other_key) as client:
        assert client.get("/billing/tasks/private").status_code == 404
        assert (
            client.post("/billing/tasks/private/complete", json={"outcome": "failed"}).status_code
            == 404
        )
    with meterline.admin() as admin:
        needs_account = admin.get("/billing/tasks/private")
        assert needs_account.status_code == 422
        assert needs_account.json()["error"]["param"] == "query.account_id"
        assert admin.get(f"/billing/tasks/private?account_id={account_id}").status_code == 200


def test_completing_records_the_outcome_once(meterline: Meterline, db: Database) -> None:
    account_id, key = meterline.customer(customer_reported_outcomes=True)
    insert_usage(
        db,
        usage_row(
            account_id, datetime.now(UTC), cost="0.25", task_id="job/7", task_type="t", model="m"
        ),
    )
    with customer_client(meterline, key) as client:
        done = client.post("/billing/tasks/job/7/complete", json={"outcome": "succeeded"})
        assert done.status_code == 200, done.text
        assert done.json()["status"] == "succeeded"
        assert done.json()["completed_at"] is not None
        again = client.post("/billing/tasks/job/7/complete", json={"outcome": "failed"})
        assert again.status_code == 409
        assert again.json()["error"]["code"] == "task_already_completed"
        assert client.get("/billing/tasks/job/7").json()["status"] == "succeeded"
        unknown = client.post("/billing/tasks/nope/complete", json={"outcome": "failed"})
        assert unknown.status_code == 404
        bad = client.post("/billing/tasks/job/7/complete", json={"outcome": "done"})
        assert bad.status_code == 422
    row = db.fetch(
        "SELECT task_type, model, completed_cost_usd FROM tasks WHERE account_id = $1",
        account_id,
    )[0]
    # The completed cost is what the history of quotes learns from.
    assert row == {"task_type": "t", "model": "m", "completed_cost_usd": Decimal("0.25")}


def test_listing_pages_every_task_newest_first(meterline: Meterline, db: Database) -> None:
    account_id, key = meterline.customer()
    start = datetime.now(UTC) - timedelta(hours=1)
    insert_usage(
        db,
        *[
            usage_row(
                account_id,
                start + timedelta(minutes=i),
                task_id=f"t{i}",
                task_type="even" if i % 2 == 0 else "odd",
                cost="0.01",
            )
            for i in range(7)
        ],
    )
    with meterline.admin() as admin:
        done = admin.post(
            "/billing/tasks/t3/complete",
            params={"account_id": str(account_id)},
            json={"outcome": "failed"},
        )
        assert done.status_code == 200, done.text
    with customer_client(meterline, key) as client:
        seen: list[str] = []
        cursor = None
        while True:
            params: dict[str, str | int] = {"limit": 3}
            if cursor:
                params["cursor"] = cursor
            page = client.get("/billing/tasks", params=params).json()
            seen += [t["id"] for t in page["data"]]
            assert all(Decimal(t["cost_usd"]) == Decimal("0.01") for t in page["data"])
            if not page["has_more"]:
                break
            cursor = page["next_cursor"]
        assert seen == [f"t{i}" for i in range(6, -1, -1)]
        failed = client.get("/billing/tasks", params={"status": "failed"}).json()["data"]
        assert [t["id"] for t in failed] == ["t3"]
        odd = client.get("/billing/tasks", params={"task_type": "odd", "status": "open"}).json()
        assert [t["id"] for t in odd["data"]] == ["t5", "t1"]
        assert client.get("/billing/tasks", params={"quoted": True}).json()["data"] == []
        bad = client.get("/billing/tasks", params={"cursor": "garbage"})
        assert bad.status_code == 422


def test_another_accounts_tasks_are_not_listed(meterline: Meterline, db: Database) -> None:
    account_id, _ = meterline.customer()
    other_id, other_key = meterline.customer()
    insert_usage(db, usage_row(account_id, datetime.now(UTC), task_id="mine"))
    with customer_client(meterline, other_key) as client:
        assert client.get("/billing/tasks").json()["data"] == []
        foreign = client.get("/billing/tasks", params={"account_id": str(account_id)})
        assert foreign.status_code == 404
    with meterline.admin() as admin:
        listed = admin.get("/billing/tasks", params={"account_id": str(account_id)}).json()
        assert [t["id"] for t in listed["data"]] == ["mine"]
        assert uuid.UUID(listed["data"][0]["account_id"]) == account_id
        assert other_id != account_id


def test_malformed_task_ids_are_clear_4xx(meterline: Meterline) -> None:
    _, key = meterline.customer()
    with customer_client(meterline, key) as client:
        assert client.get("/billing/tasks/a%00b").status_code == 422
        assert client.get("/billing/tasks/" + "x" * 129).status_code == 422
        assert client.get("/billing/tasks", params={"task_type": "a\x00"}).status_code == 422
