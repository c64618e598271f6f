"""The monthly export through the API and the command line, against hand-computed rows."""

from __future__ import annotations

import csv
import io
import json
import secrets
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ADMIN_TOKEN, Meterline
from tests.support import ROOT, Database
from tests.usage_rows import insert_usage, usage_row

PERIOD = "2025-05"


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def quoted_task(db: Database, account_id: str, external_id: str, task_type: str) -> None:
    """A task opened from a quote accepted as May began, succeeded on the 20th."""
    quote_id = db.fetchval(
        "INSERT INTO quotes (account_id, task_type, model, basis, sample_size, confidence,"
        " margin, expected_cost_usd, quantile_cost_usd, price_usd, valid_until, accepted_at)"
        " VALUES ($1, $2, 'm-a', 'estimate', 0, 0.9, 0.2, 0.001, 0.001, 0.05, now(), now())"
        " RETURNING id",
        uuid.UUID(account_id),
        task_type,
    )
    db.execute(
        "INSERT INTO tasks (account_id, external_id, task_type, model, quote_id,"
        " fixed_price_usd, status, created_at, completed_at, billed_as)"
        " VALUES ($1, $2, $3, 'm-a', $4, 0.05, 'succeeded', $5, $6, 'fixed_price')",
        uuid.UUID(account_id),
        external_id,
        task_type,
        quote_id,
        at("2025-05-01T00:00:00"),
        at("2025-05-20T00:00:00"),
    )


def invoice(db: Database, account_id: str, status: str, total: str) -> str:
    number = f"INV-T-{secrets.token_hex(4)}" if status == "finalized" else None
    db.execute(
        "INSERT INTO invoices (account_id, period, status, number, total_usd)"
        " VALUES ($1, $2, $3, $4, $5)",
        uuid.UUID(account_id),
        PERIOD,
        status,
        number,
        Decimal(total),
    )
    return number or ""


@pytest.fixture(scope="module")
def may(meterline: Meterline, db: Database) -> dict[str, Any]:
    """Two accounts' May 2025: models, a quoted task, an unquoted one, an invoice."""
    acme = str(meterline.new_account(name="Report Acme")["id"])
    zeta = str(meterline.new_account(name="Report Zeta")["id"])
    quoted_task(db, acme, "job-q", "summarize")
    insert_usage(
        db,
        usage_row(acme, at("2025-05-01T00:00:00"), model="m-a", prompt=100, completion=10),
        usage_row(acme, at("2025-05-10T00:00:00"), model="m-a", prompt=200, completion=20),
        # An unquoted task stays in the account's plain model row.
        usage_row(
            acme,
            at("2025-05-11T00:00:00"),
            model="m-a",
            prompt=1,
            completion=1,
            cost="0.000002",
            task_id="job-free",
            task_type="translate",
        ),
        usage_row(
            acme,
            at("2025-05-12T00:00:00"),
            model="m-a",
            prompt=50,
            completion=50,
            cost="0.0001",
            task_id="job-q",
            task_type="summarize",
        ),
        usage_row(
            acme,
            at("2025-05-12T00:01:00"),
            model="m-a",
            prompt=50,
            completion=150,
            cost="0.0002",
            task_id="job-q",
            task_type="summarize",
            cached=7,
        ),
        usage_row(acme, at("2025-05-31T23:59:59"), model="m-b", prompt=3, completion=4, cost=None),
        usage_row(zeta, at("2025-05-20T00:00:00"), model="m-a", prompt=9, completion=1, cost="1.5"),
        # Outside May.
        usage_row(acme, at("2025-06-01T00:00:00"), model="m-a", prompt=10**6),
        usage_row(acme, at("2025-04-30T23:59:59"), model="m-a", prompt=10**6),
    )
    number = invoice(db, acme, "finalized", "0.02")
    return {"acme": acme, "zeta": zeta, "number": number}


def _export(meterline: Meterline, token: str = ADMIN_TOKEN, **params: Any) -> httpx.Response:
    return httpx.get(
        f"{meterline.url}/billing/reports/monthly",
        params={"period": PERIOD, **params},
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )


def _csv(response: httpx.Response) -> list[dict[str, str]]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/csv")
    return list(csv.DictReader(io.StringIO(response.text)))


def test_csv_rows_per_account_model_and_quoted_task_type(
    meterline: Meterline, may: dict[str, Any]
) -> None:
    rows = _csv(_export(meterline, account_id=may["acme"]))
    lines = [r for r in rows if r["row_type"] == "line"]
    assert [(r["kind"], r["model"], r["task_type"]) for r in lines] == [
        ("tokens", "m-a", ""),
        ("task_usage", "m-a", "summarize"),
        ("task", "m-a", "summarize"),
        ("tokens", "m-b", ""),
    ]
    plain, quoted, task, unpriced = lines
    assert plain["account_name"] == "Report Acme"
    assert plain["account_id"] == may["acme"]
    assert plain["period"] == PERIOD
    assert (plain["requests"], plain["prompt_tokens"], plain["completion_tokens"]) == (
        "3",
        "301",
        "31",
    )
    assert plain["total_tokens"] == "332"
    assert Decimal(plain["cost_usd"]) == Decimal("0.000032")
    assert (quoted["requests"], quoted["total_tokens"], quoted["cached_tokens"]) == (
        "2",
        "300",
        "7",
    )
    assert Decimal(quoted["cost_usd"]) == Decimal("0.0003")
    # Billed: usage per token at its cost; a quoted task's usage through the task, which is
    # billed its fixed price in the month it completed.
    assert Decimal(plain["billed_usd"]) == Decimal("0.000032")
    assert Decimal(quoted["billed_usd"]) == 0
    assert (task["tasks"], task["requests"], Decimal(task["billed_usd"])) == (
        "1",
        "0",
        Decimal("0.05"),
    )
    assert (unpriced["unpriced_requests"], Decimal(unpriced["cost_usd"])) == ("1", Decimal(0))
    for line in lines:
        assert line["invoice_number"] == may["number"]
        assert line["invoice_status"] == "finalized"
        assert Decimal(line["invoice_total_usd"]) == Decimal("0.02")
    [total] = [r for r in rows if r["row_type"] == "total"]
    assert rows[-1] is total
    assert (total["requests"], total["prompt_tokens"], total["completion_tokens"]) == (
        "6",
        "404",
        "235",
    )
    assert Decimal(total["cost_usd"]) == Decimal("0.000332")
    assert (total["tasks"], Decimal(total["billed_usd"])) == ("1", Decimal("0.050032"))
    assert Decimal(total["invoice_total_usd"]) == Decimal("0.02")
    assert list(rows[0]) == [
        "row_type",
        "period",
        "account_id",
        "account_name",
        "kind",
        "model",
        "task_type",
        "tasks",
        "requests",
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "cached_tokens",
        "reasoning_tokens",
        "cost_usd",
        "unpriced_requests",
        "billed_usd",
        "invoice_number",
        "invoice_status",
        "invoice_total_usd",
        "invoice_credited_usd",
        "invoice_amount_due_usd",
    ]
    # No credit note: all of the invoice is due.
    assert (total["invoice_credited_usd"], total["invoice_amount_due_usd"]) == ("0.00", "0.02")


def test_json_has_the_same_figures(meterline: Meterline, may: dict[str, Any]) -> None:
    response = _export(meterline, account_id=may["acme"], format="json")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    report = response.json()
    assert report["period"] == PERIOD
    csv_rows = _csv(_export(meterline, account_id=may["acme"]))
    assert len(report["data"]) == len(csv_rows) - 1
    for line, row in zip(report["data"], csv_rows, strict=False):
        assert line["model"] == row["model"]
        assert line["requests"] == int(row["requests"])
        assert line["cost_usd"] == row["cost_usd"]
        assert isinstance(line["cost_usd"], str)
    assert report["totals"]["requests"] == 6
    assert Decimal(report["totals"]["cost_usd"]) == Decimal("0.000332")


def test_all_accounts_ordered_by_name_with_one_totals_row(
    meterline: Meterline, may: dict[str, Any]
) -> None:
    rows = _csv(_export(meterline))
    names = [r["account_name"] for r in rows if r["row_type"] == "line"]
    assert names == sorted(names, key=lambda n: (n == "", n))
    assert "Report Zeta" in names and "Report Acme" in names
    lines = [r for r in rows if r["row_type"] == "line"]
    [total] = [r for r in rows if r["row_type"] == "total"]
    assert int(total["requests"]) == sum(int(r["requests"]) for r in lines)
    assert Decimal(total["cost_usd"]) == sum(Decimal(r["cost_usd"]) for r in lines)
    zeta = [r for r in lines if r["account_id"] == may["zeta"]]
    assert [(z["invoice_number"], z["invoice_status"]) for z in zeta] == [("", "")]


def test_export_totals_equal_the_usage_api(meterline: Meterline, may: dict[str, Any]) -> None:
    for account in (may["acme"], None):
        params = {"account_id": account} if account else {}
        [total] = [r for r in _csv(_export(meterline, **params)) if r["row_type"] == "total"]
        with meterline.admin() as admin:
            [usage] = admin.get(
                "/billing/usage",
                params={**params, "start": "2025-05-01T00:00:00Z", "end": "2025-06-01T00:00:00Z"},
            ).json()["data"]
        for field in ("requests", "prompt_tokens", "completion_tokens", "total_tokens"):
            assert int(total[field]) == usage[field], field
        assert Decimal(total["cost_usd"]) == Decimal(usage["cost_usd"])
        assert int(total["unpriced_requests"]) == usage["unpriced_requests"]


def test_a_live_invoice_is_preferred_to_a_voided_one(meterline: Meterline, db: Database) -> None:
    account = str(meterline.new_account(name="Report Void")["id"])
    insert_usage(db, usage_row(account, at("2025-05-03T00:00:00")))
    invoice(db, account, "void", "9.99")
    [line] = [r for r in _csv(_export(meterline, account_id=account)) if r["row_type"] == "line"]
    assert line["invoice_status"] == "void"
    invoice(db, account, "draft", "0.01")
    [line] = [r for r in _csv(_export(meterline, account_id=account)) if r["row_type"] == "line"]
    assert (line["invoice_status"], line["invoice_number"]) == ("draft", "")
    assert line["invoice_total_usd"] == "0.01"


def test_cells_that_a_spreadsheet_would_run_are_defused(meterline: Meterline, db: Database) -> None:
    account = str(meterline.new_account(name='=HYPERLINK("http://x")')["id"])
    insert_usage(db, usage_row(account, at("2025-05-04T00:00:00")))
    response = _export(meterline, account_id=account)
    [line] = [r for r in _csv(response) if r["row_type"] == "line"]
    assert line["account_name"] == '\'=HYPERLINK("http://x")'
    # JSON is data, not a spreadsheet: the name is exact there.
    report = _export(meterline, account_id=account, format="json").json()
    assert report["data"][0]["account_name"] == '=HYPERLINK("http://x")'


def test_formulas_behind_leading_blanks_are_defused_too(meterline: Meterline, db: Database) -> None:
    """A spreadsheet skips leading spaces (and line breaks) and runs what follows."""
    account = str(meterline.new_account(name=" =1+1")["id"])
    # Models as a ledger may hold them (written by the proxy, not the billing API).
    risky = [" =cmd|' /C calc'!A0", "  @SUM(A1)", "\t+1", "\r-1", "\n=1", " \t=2"]
    # A CR inside a cell is quoted, so it cannot start a row (and a formula) of its own.
    safe = ["  plain", "a=b", "x\r=3", "-"]
    for model in risky + safe:
        insert_usage(db, usage_row(account, at("2025-05-05T00:00:00"), model=model))
    lines = [r for r in _csv(_export(meterline, account_id=account)) if r["row_type"] == "line"]
    assert {line["account_name"] for line in lines} == {"' =1+1"}
    cells = {line["model"] for line in lines}
    assert cells == {"'" + m for m in risky} | {"'-"} | set(safe[:3])


def test_an_empty_month_still_has_a_header_and_totals(meterline: Meterline) -> None:
    response = _export(meterline, period="1999-01")
    assert response.text.splitlines()[0].startswith("row_type,period,")
    [total] = _csv(response)
    assert (total["row_type"], total["requests"], total["cost_usd"]) == ("total", "0", "0")
    assert response.headers["content-disposition"] == (
        'attachment; filename="meterline-1999-01.csv"'
    )


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"period": "2025-13"}, "query.period"),
        ({"period": "May 2025"}, "query.period"),
        ({"period": "0000-01"}, "query.period"),
        ({"period": "9999-12"}, "query.period"),
        ({"format": "xlsx"}, "query.format"),
        ({"account_id": "x"}, "query.account_id"),
    ],
)
def test_bad_parameters_are_422_before_streaming(
    meterline: Meterline, params: dict[str, Any], param: str
) -> None:
    response = _export(meterline, **params)
    assert response.status_code == 422
    assert response.json()["error"]["param"] == param


def test_a_customer_key_exports_its_own_account_only(
    meterline: Meterline, may: dict[str, Any]
) -> None:
    key = meterline.new_key(may["zeta"])
    rows = _csv(_export(meterline, token=key))
    assert {r["account_id"] for r in rows if r["row_type"] == "line"} == {may["zeta"]}
    assert _export(meterline, token=key, account_id=may["acme"]).status_code == 404


def _cli(meterline: Meterline, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service", *args, "--url", meterline.url, "--token", ADMIN_TOKEN],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_writes_the_same_export_to_a_file(
    meterline: Meterline, may: dict[str, Any], tmp_path: Path
) -> None:
    out = tmp_path / "may.csv"
    result = _cli(
        meterline,
        "report",
        "monthly",
        "--period",
        PERIOD,
        "--format",
        "csv",
        "-o",
        str(out),
        "--account-id",
        may["acme"],
    )
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == _export(meterline, account_id=may["acme"]).content
    assert "wrote 4 rows" in result.stderr
    assert not (tmp_path / "may.csv.part").exists()

    as_json = _cli(
        meterline,
        "report",
        "monthly",
        "--period",
        PERIOD,
        "--format",
        "json",
        "--account-id",
        may["acme"],
    )
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout)["totals"]["requests"] == 6

    bad = _cli(meterline, "report", "monthly", "--period", "2025-5", "-o", str(tmp_path / "x"))
    assert bad.returncode == 1
    assert "--period: period must be a month YYYY-MM" in bad.stderr
    assert not (tmp_path / "x").exists()


def test_export_totals_equal_the_usage_api_and_the_invoice(
    meterline: Meterline, db: Database
) -> None:
    """The three views of one account's month agree: export, usage API, finalized invoice."""
    account = str(meterline.new_account(name="Report Invoice")["id"])
    period, start, end = "2025-08", "2025-08-01T00:00:00Z", "2025-09-01T00:00:00Z"
    insert_usage(
        db,
        usage_row(
            account,
            at("2025-08-01T00:00:00"),
            model="m-a",
            prompt=1000,
            completion=10,
            cost="0.004005",
        ),
        usage_row(
            account,
            at("2025-08-09T10:00:00"),
            model="m-a",
            prompt=3000,
            completion=30,
            cost="0.008015",
        ),
        usage_row(
            account,
            at("2025-08-31T23:59:59"),
            model="m-b",
            prompt=77,
            completion=700,
            cost="1.234567891234",
        ),
        usage_row(account, at("2025-09-01T00:00:00"), model="m-b", prompt=5, cost="9"),
    )
    with meterline.admin() as admin:
        created = admin.post("/billing/invoices", json={"account_id": account, "period": period})
        assert created.status_code == 201, created.text
        finalized = admin.post(f"/billing/invoices/{created.json()['id']}/finalize")
        assert finalized.status_code == 200, finalized.text
        bill = finalized.json()
        [usage] = admin.get(
            "/billing/usage", params={"account_id": account, "start": start, "end": end}
        ).json()["data"]
    rows = _csv(_export(meterline, period=period, account_id=account))
    lines = [r for r in rows if r["row_type"] == "line"]
    [total] = [r for r in rows if r["row_type"] == "total"]

    # Export = usage API.
    for field in ("requests", "prompt_tokens", "completion_tokens", "total_tokens"):
        assert int(total[field]) == usage[field], field
    assert Decimal(total["cost_usd"]) == Decimal(usage["cost_usd"]) == Decimal("1.246587891234")
    # Export = invoice: the same requests and tokens, the same exact amount, and the same
    # billed total once each model's line is rounded to cents.
    bill_lines = bill["lines"]
    assert sum(line["quantity"] for line in bill_lines) == int(total["requests"])
    assert sum(line["prompt_tokens"] for line in bill_lines) == int(total["prompt_tokens"])
    assert sum(line["completion_tokens"] for line in bill_lines) == int(total["completion_tokens"])
    assert sum(Decimal(line["amount_exact_usd"]) for line in bill_lines) == Decimal(
        total["cost_usd"]
    )
    rounded = sum(Decimal(r["cost_usd"]).quantize(Decimal("0.01"), "ROUND_HALF_UP") for r in lines)
    assert Decimal(bill["total_usd"]) == rounded == Decimal("1.24")
    assert Decimal(total["invoice_total_usd"]) == Decimal(bill["total_usd"])
    # And the export names the invoice.
    assert {(r["invoice_number"], r["invoice_status"]) for r in lines} == {
        (bill["number"], "finalized")
    }
