"""The proxy's task guard on its own: how its in-memory view follows the database."""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, cast

import asyncpg
import httpx
import pytest

from service.db.engine import asyncpg_dsn
from service.db.listener import Listener
from service.ledger.record import LedgerRecord
from service.proxy.context import RequestContext
from service.tasks.guard import TaskClosed, TaskCostCapReached, TaskGuard, TaskModelMismatch
from tests.conftest import ADMIN_TOKEN, Meterline
from tests.support import Database
from tests.usage_rows import COLUMNS, usage_row

PRICED = "meta-llama/Llama-3.3-70B-Instruct"
NO_CONTEXT = cast(RequestContext, None)  # `settle` reads only the record


async def execute(db: Database, sql: str, *args: object) -> None:
    connection = await asyncpg.connect(db.dsn)
    try:
        await connection.execute(sql, *args)
    finally:
        await connection.close()


async def insert_usage(db: Database, row: dict[str, object]) -> None:
    await execute(db, "SELECT meterline_ensure_usage_partition(now())")
    placeholders = ", ".join(f"${i}" for i in range(1, len(COLUMNS) + 1))
    await execute(
        db,
        f"INSERT INTO usage_ledger ({', '.join(COLUMNS)}) VALUES ({placeholders})",
        *(row[c] for c in COLUMNS),
    )


def record(
    account_id: uuid.UUID, task_id: str, cost: str | None, at: datetime | None = None
) -> LedgerRecord:
    return LedgerRecord(
        request_id="req_" + secrets.token_hex(12),
        occurred_at=at or datetime.now(UTC),
        account_id=account_id,
        key_id=None,
        task_id=task_id,
        task_type=None,
        endpoint="chat",
        requested_model=PRICED,
        upstream_model=PRICED,
        provider="mock",
        stream=False,
        status_code=200,
        error_code=None,
        prompt_tokens=10,
        completion_tokens=10,
        total_tokens=20,
        cached_tokens=0,
        reasoning_tokens=0,
        usage_source="upstream",
        latency_ms=1,
        ttft_ms=None,
        cost_usd=None if cost is None else Decimal(cost),
        price_version_id=None,
    )


@pytest.fixture
async def guard(database_url: str) -> AsyncIterator[TaskGuard]:
    # A refresh period far beyond the test: only notifications and explicit reloads act.
    listener = Listener(asyncpg_dsn(database_url))
    guard = TaskGuard(asyncpg_dsn(database_url), refresh_s=3600, listener=listener)
    await listener.start()
    await guard.start()
    try:
        yield guard
    finally:
        await guard.stop()
        await listener.close()


async def eventually(condition: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not callable(condition) or not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def admit(
    guard: TaskGuard,
    account_id: uuid.UUID,
    task_id: str,
    model: str = PRICED,
    at: datetime | None = None,
) -> None:
    """The guard's check of a request on `task_id` for `model`, occurring `at` (now)."""
    guard.check(account_id, task_id, model, at or datetime.now(UTC))


def refuses(guard: TaskGuard, account_id: uuid.UUID, task_id: str) -> bool:
    try:
        admit(guard, account_id, task_id)
    except (TaskClosed, TaskCostCapReached):
        return True
    return False


async def accept_quote(
    guard: TaskGuard, meterline: Meterline, account_id: uuid.UUID, key: str
) -> dict[str, Any]:
    """A quoted task on PRICED ($0.01, cap $0.03), once its acceptance reached `guard`."""
    async with httpx.AsyncClient(
        base_url=meterline.url, headers={"Authorization": f"Bearer {key}"}
    ) as client:
        quote = await client.post(
            "/billing/quotes",
            json={
                "task_type": "t",
                "model": PRICED,
                "prompt_tokens": 10_000,
                "max_completion_tokens": 10_000,
            },
        )
        task: dict[str, Any] = (
            await client.post(f"/billing/quotes/{quote.json()['id']}/accept")
        ).json()
    assert task["fixed_price_usd"] == "0.01" and Decimal(task["cost_cap_usd"]) == Decimal("0.03")
    # The acceptance reaches this guard by notification, with its cap.
    await eventually(lambda: guard.open_cost(account_id, task["id"]) is not None)
    return task


async def test_a_completion_in_another_process_arrives_by_notification(
    guard: TaskGuard, meterline: Meterline, db: Database
) -> None:
    account_id, _ = meterline.customer()
    await insert_usage(db, usage_row(account_id, datetime.now(UTC), task_id="notified"))
    admit(guard, account_id, "notified")
    async with httpx.AsyncClient(
        base_url=meterline.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
    ) as admin:
        done = await admin.post(
            "/billing/tasks/notified/complete",
            params={"account_id": str(account_id)},
            json={"outcome": "failed"},
        )
        assert done.status_code == 200
    await eventually(lambda: refuses(guard, account_id, "notified"))
    with pytest.raises(TaskClosed):
        admit(guard, account_id, "notified")
    # The same id in another account is another task.
    admit(guard, uuid.uuid4(), "notified")


async def test_a_new_guard_loads_every_closed_task(
    database_url: str, meterline: Meterline, db: Database
) -> None:
    account_id, _ = meterline.customer()
    for i in range(20):
        await execute(
            db,
            "INSERT INTO tasks (account_id, external_id, status, completed_at)"
            " VALUES ($1, $2, 'succeeded', now())",
            account_id,
            f"closed-{i}",
        )
    guard = TaskGuard(asyncpg_dsn(database_url), refresh_s=3600)
    await guard.start()
    try:
        assert all(refuses(guard, account_id, f"closed-{i}") for i in range(20))
        assert not refuses(guard, account_id, "closed-20")
        assert not refuses(guard, account_id, "other")
    finally:
        await guard.stop()


async def test_a_quoted_tasks_cost_counts_each_request_once(
    guard: TaskGuard, meterline: Meterline, db: Database
) -> None:
    account_id, key = meterline.customer()
    task = await accept_quote(guard, meterline, account_id, key)
    task_id = task["id"]

    first = record(account_id, task_id, "0.02")
    await guard.settle(NO_CONTEXT, first)
    admit(guard, account_id, task_id)  # 0.02 of 0.03
    # The ledger now holds the request: after a reload it counts once, not twice.
    await insert_usage(
        db,
        usage_row(
            account_id, first.occurred_at, cost="0.02", task_id=task_id, request_id=first.request_id
        ),
    )
    await guard.reload()
    assert guard.open_cost(account_id, task_id) == Decimal("0.02")
    admit(guard, account_id, task_id)

    await guard.settle(NO_CONTEXT, record(account_id, task_id, "0.01"))
    assert guard.open_cost(account_id, task_id) == Decimal("0.03")
    with pytest.raises(TaskCostCapReached):
        admit(guard, account_id, task_id)
    # Still refused after a reload that has not seen the second request yet.
    await guard.reload()
    with pytest.raises(TaskCostCapReached):
        admit(guard, account_id, task_id)


async def test_the_quote_binds_its_model_from_the_acceptance_on(
    guard: TaskGuard, meterline: Meterline
) -> None:
    account_id, key = meterline.customer()
    task = await accept_quote(guard, meterline, account_id, key)
    accepted = datetime.fromisoformat(task["created_at"])
    admit(guard, account_id, task["id"], PRICED)
    with pytest.raises(TaskModelMismatch) as mismatch:
        admit(guard, account_id, task["id"], "unpriced/other")
    assert mismatch.value.status_code == 409
    assert mismatch.value.headers == {"x-should-retry": "false"}
    # A request that occurred before the acceptance is not the task's: ordinary usage.
    admit(guard, account_id, task["id"], "unpriced/other", accepted - timedelta(milliseconds=1))


async def test_usage_without_a_price_counts_as_the_cap_reached(
    guard: TaskGuard, meterline: Meterline, db: Database
) -> None:
    account_id, key = meterline.customer()
    settled = await accept_quote(guard, meterline, account_id, key)
    await guard.settle(NO_CONTEXT, record(account_id, settled["id"], None))
    with pytest.raises(TaskCostCapReached, match="without a price"):
        admit(guard, account_id, settled["id"])
    # The same when the unpriced row reaches this process through the ledger.
    loaded = await accept_quote(guard, meterline, account_id, key)
    await insert_usage(
        db, usage_row(account_id, datetime.now(UTC), cost=None, task_id=loaded["id"])
    )
    admit(guard, account_id, loaded["id"])
    await guard.reload()
    with pytest.raises(TaskCostCapReached, match="without a price"):
        admit(guard, account_id, loaded["id"])


async def test_only_requests_from_the_acceptance_on_count_toward_the_cap(
    guard: TaskGuard, meterline: Meterline, db: Database
) -> None:
    account_id, key = meterline.customer()
    task = await accept_quote(guard, meterline, account_id, key)
    task_id = task["id"]
    before = datetime.fromisoformat(task["created_at"]) - timedelta(seconds=1)
    # A dollar of usage on the task id before its acceptance, settled here and in the ledger.
    await guard.settle(NO_CONTEXT, record(account_id, task_id, "1.00", before))
    await insert_usage(db, usage_row(account_id, before, cost="1.00", task_id=task_id))
    await guard.settle(NO_CONTEXT, record(account_id, task_id, None, before))
    assert guard.open_cost(account_id, task_id) == 0
    await guard.reload()
    assert guard.open_cost(account_id, task_id) == 0
    admit(guard, account_id, task_id)
    await guard.settle(NO_CONTEXT, record(account_id, task_id, "0.03"))
    with pytest.raises(TaskCostCapReached):
        admit(guard, account_id, task_id)


async def test_a_request_past_a_quoted_tasks_deadline_is_refused_before_it_expires(
    guard: TaskGuard, meterline: Meterline
) -> None:
    account_id, key = meterline.customer()
    task = await accept_quote(guard, meterline, account_id, key)
    deadline = datetime.fromisoformat(task["expires_at"])
    # The expiry job has not run (the task is open in the database): the deadline alone
    # refuses, as learnt from the acceptance's notification and from a reload.
    for _ in ("notified", "reloaded"):
        admit(guard, account_id, task["id"], at=deadline - timedelta(milliseconds=1))
        with pytest.raises(TaskClosed, match="expired at its deadline") as refused:
            admit(guard, account_id, task["id"], at=deadline)
        assert refused.value.status_code == 409
        assert refused.value.code == "task_completed"
        await guard.reload(full=True)
    # A request sent before the acceptance under the same id is ordinary usage still.
    accepted = datetime.fromisoformat(task["created_at"])
    admit(guard, account_id, task["id"], at=accepted - timedelta(milliseconds=1))
