"""The margin report: revenue against cost per task type and model, and quote calibration."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import asyncpg
import httpx

from tests.conftest import ADMIN_TOKEN, Meterline
from tests.support import ROOT, Database
from tests.usage_rows import insert_usage, usage_row

PERIOD = "2026-09"
IN_PERIOD = datetime(2026, 9, 15, 12, tzinfo=UTC)
AFTER_PERIOD = datetime(2026, 10, 2, tzinfo=UTC)


async def _quoted_task(
    dsn: str,
    account_id: uuid.UUID,
    task_type: str,
    model: str,
    *,
    quantile_cost: str,
    price: str,
    confidence: str,
    status: str,
    completed_at: datetime | None,
    billed_as: str | None,
) -> str:
    connection = await asyncpg.connect(dsn)
    try:
        quote_id = await connection.fetchval(
            "INSERT INTO quotes (account_id, task_type, model, basis, sample_size, confidence,"
            " margin, expected_cost_usd, quantile_cost_usd, price_usd, valid_until, accepted_at)"
            " VALUES ($1, $2, $3, 'history', 100, $4, 0.2, $5, $5, $6, $7, $7) RETURNING id",
            account_id,
            task_type,
            model,
            Decimal(confidence),
            Decimal(quantile_cost),
            Decimal(price),
            IN_PERIOD,
        )
        external_id = f"q_{uuid.uuid4().hex[:12]}"
        await connection.execute(
            "INSERT INTO tasks (account_id, external_id, task_type, model, quote_id,"
            " fixed_price_usd, cost_cap_usd, status, created_at, completed_at, billed_as)"
            " VALUES ($1, $2, $3, $4, $5, $6::numeric, $6::numeric * 3, $7, $8, $9, $10)",
            account_id,
            external_id,
            task_type,
            model,
            quote_id,
            Decimal(price),
            status,
            IN_PERIOD,
            completed_at,
            billed_as,
        )
        return external_id
    finally:
        await connection.close()


def quoted_task(
    db: Database, account_id: uuid.UUID, cost: str, status: str = "succeeded", **quote: Any
) -> str:
    fields: dict[str, Any] = {
        "task_type": "summarize",
        "model": "m-1",
        "quantile_cost": "1.00",
        "price": "1.20",
        "confidence": "0.9",
        "completed_at": IN_PERIOD if status != "open" else None,
        # As completion fixes it under the account's default policies.
        "billed_as": {"succeeded": "fixed_price", "failed": "free"}.get(status),
        **quote,
    }
    task_id = asyncio.run(
        _quoted_task(
            db.dsn,
            account_id,
            fields.pop("task_type"),
            fields.pop("model"),
            status=status,
            **fields,
        )
    )
    # The task's cost, split over two requests.
    half = Decimal(cost) / 2
    insert_usage(
        db,
        usage_row(account_id, IN_PERIOD, cost=half, task_id=task_id),
        usage_row(account_id, IN_PERIOD, cost=half, task_id=task_id),
    )
    return task_id


def report(meterline: Meterline, account_id: uuid.UUID) -> dict[str, Any]:
    with meterline.admin() as admin:
        response = admin.get(
            "/billing/reports/margin", params={"period": PERIOD, "account_id": str(account_id)}
        )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_margin_and_calibration_per_type_and_model(meterline: Meterline, db: Database) -> None:
    account_id, _ = meterline.customer()
    # Quoted at p90 = $1.00 (+20 % = $1.20): 7 came in under the quantile, 2 between quantile
    # and price, 1 above the price. The last two failed (free under the default policy).
    for cost in ["0.50"] * 7 + ["1.10"]:
        quoted_task(db, account_id, cost)
    quoted_task(db, account_id, "1.10", status="failed")
    quoted_task(db, account_id, "2.00", status="failed")
    # Not in the report: still open, completed in another month, not quoted.
    quoted_task(db, account_id, "5.00", status="open")
    quoted_task(db, account_id, "5.00", completed_at=AFTER_PERIOD)
    insert_usage(db, usage_row(account_id, IN_PERIOD, cost="9", task_id="plain"))
    db.execute(
        "INSERT INTO tasks (account_id, external_id, status, completed_at) "
        "VALUES ($1, 'plain', 'succeeded', $2)",
        account_id,
        IN_PERIOD,
    )
    # Another model, quoted at p80.
    quoted_task(db, account_id, "0.10", model="m-2", confidence="0.8", price="0.30")

    body = report(meterline, account_id)
    rows = {(r["task_type"], r["model"]): r for r in body["rows"]}
    assert set(rows) == {("summarize", "m-1"), ("summarize", "m-2")}
    row = rows[("summarize", "m-1")]
    assert (row["tasks"], row["succeeded"], row["failed"]) == (10, 8, 2)
    assert Decimal(row["fixed_price_revenue_usd"]) == Decimal("9.60")
    assert Decimal(row["at_cost_revenue_usd"]) == 0
    assert Decimal(row["cost_usd"]) == Decimal("7.70")
    assert Decimal(row["margin_usd"]) == Decimal("1.90")
    assert Decimal(row["margin_pct"]) == Decimal("19.79")
    assert Decimal(row["confidence"]) == Decimal("0.9")
    assert Decimal(row["within_quantile_share"]) == Decimal("0.7")
    assert Decimal(row["within_price_share"]) == Decimal("0.9")

    other = rows[("summarize", "m-2")]
    assert Decimal(other["confidence"]) == Decimal("0.8")
    assert Decimal(other["within_quantile_share"]) == 1

    total = body["total"]
    assert total["tasks"] == 11
    assert Decimal(total["revenue_usd"]) == Decimal("9.90")
    assert Decimal(total["cost_usd"]) == Decimal("7.80")
    assert Decimal(total["margin_usd"]) == Decimal("2.10")


def test_failed_tasks_earn_their_cost_under_the_cost_policy(
    meterline: Meterline, db: Database
) -> None:
    account = meterline.new_account(failed_task_policy="cost")
    account_id = uuid.UUID(str(account["id"]))
    for cost in ("0.30", "0.40"):
        quoted_task(db, account_id, cost, status="failed", task_type="translate", billed_as="cost")
    (row,) = report(meterline, account_id)["rows"]
    assert (row["tasks"], row["succeeded"], row["failed"]) == (2, 0, 2)
    assert Decimal(row["revenue_usd"]) == Decimal(row["cost_usd"]) == Decimal("0.70")
    assert Decimal(row["margin_usd"]) == 0 and Decimal(row["margin_pct"]) == 0


def test_an_empty_month_and_the_access_rules(meterline: Meterline) -> None:
    account_id, key = meterline.customer()
    body = report(meterline, account_id)
    assert body["rows"] == []
    assert body["total"]["tasks"] == 0 and body["total"]["margin_pct"] is None
    with httpx.Client(base_url=meterline.url, headers={"Authorization": f"Bearer {key}"}) as c:
        # Margins show Meterline's own costs: the admin's report only.
        assert c.get("/billing/reports/margin", params={"period": PERIOD}).status_code == 404
    with meterline.admin() as admin:
        bad = admin.get("/billing/reports/margin", params={"period": "2026-13"})
        assert bad.status_code == 422


def test_the_margin_command(meterline: Meterline, db: Database) -> None:
    account_id, _ = meterline.customer()
    quoted_task(db, account_id, "0.50")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "service",
            "report",
            "margin",
            "--period",
            PERIOD,
            "--account-id",
            str(account_id),
            "--json",
            "--url",
            meterline.url,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "METERLINE_TOKEN": ADMIN_TOKEN},
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["rows"][0]["tasks"] == 1
    assert body["rows"][0]["margin_usd"] == "0.700000000000"
