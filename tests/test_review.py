"""Usage an operator reviews: flagged claims block finalization until accepted or adjusted;
rows Postgres refused are listed in the quarantine report and counted in /metrics."""

from __future__ import annotations

import secrets
import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pricing.invoice import BillingPeriod
from service.ledger.record import LedgerRecord, new_request_id
from tests.conftest import Meterline
from tests.support import Database
from tests.test_ledger import record
from tests.usage_rows import insert_usage, usage_row

RATE = Decimal("2")  # $ per million tokens, in and out


@pytest.fixture(scope="module")
def model(meterline: Meterline) -> tuple[str, int]:
    """A model of this module's own, priced from 1970 on: (name, price version id)."""
    name = f"meta-llama/review-{secrets.token_hex(3)}"
    with meterline.admin() as admin:
        response = admin.post(
            "/billing/prices",
            json={
                "model": name,
                "input_usd_per_mtok": str(RATE),
                "output_usd_per_mtok": str(RATE),
                "effective_from": "1970-01-01T00:00:00Z",
            },
        )
        assert response.status_code == 201, response.text
        return name, int(response.json()["id"])


def months_ago(n: int) -> BillingPeriod:
    period = BillingPeriod.of(datetime.now(UTC))
    for _ in range(n):
        period = BillingPeriod.of(period.start - timedelta(days=1))
    return period


def priced_row(
    account_id: uuid.UUID,
    model: tuple[str, int],
    at: datetime,
    completion: int,
    flag: str | None = None,
) -> dict[str, Any]:
    cost = (10 + completion) * RATE / 1_000_000
    return usage_row(
        account_id,
        at,
        prompt=10,
        completion=completion,
        cost=cost,
        model=model[0],
        price_version_id=model[1],
        flag=flag,
    )


def draft(admin: httpx.Client, account_id: uuid.UUID, period: BillingPeriod) -> str:
    response = admin.post(
        "/billing/invoices", json={"account_id": str(account_id), "period": str(period)}
    )
    assert response.status_code in (200, 201), response.text
    invoice_id: str = response.json()["id"]
    return invoice_id


def flagged(admin: httpx.Client, period: BillingPeriod, **params: Any) -> dict[str, Any]:
    response = admin.get("/billing/reports/flagged", params={"period": str(period), **params})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_flagged_usage_blocks_finalization_until_accepted_or_adjusted(
    meterline: Meterline, db: Database, model: tuple[str, int]
) -> None:
    account_id, key = meterline.customer()
    period = months_ago(1)
    at = period.start + timedelta(days=3)
    ordinary = priced_row(account_id, model, at, 20)
    absurd = priced_row(
        account_id, model, at + timedelta(hours=1), 4_294_967_295, "completion_over_limit"
    )
    huge = priced_row(account_id, model, at + timedelta(hours=2), 30, "implausible_count")
    insert_usage(db, ordinary, absurd, huge)

    with meterline.admin() as admin:
        report = flagged(admin, period, account_id=str(account_id))
        assert [r["request_id"] for r in report["data"]] == [
            absurd["request_id"],
            huge["request_id"],
        ]
        first = report["data"][0]
        assert (first["completion_tokens"], first["usage_flag"], first["review"]) == (
            4_294_967_295,
            "completion_over_limit",
            None,
        )
        assert Decimal(first["cost_usd"]) == absurd["cost_usd"]

        invoice_id = draft(admin, account_id, period)
        refused = admin.post(f"/billing/invoices/{invoice_id}/finalize")
        assert refused.status_code == 409
        error = refused.json()["error"]
        assert error["code"] == "flagged_usage"
        assert absurd["request_id"] in error["message"] and huge["request_id"] in error["message"]

        accepted = admin.post(
            f"/billing/reports/flagged/{absurd['request_id']}/accept",
            json={"note": "provider confirmed the long generation"},
        )
        assert accepted.status_code == 200, accepted.text
        assert accepted.json()["review"]["decision"] == "accepted"
        again = admin.post(f"/billing/reports/flagged/{absurd['request_id']}/accept", json={})
        assert again.status_code == 200 and again.json()["review"] == accepted.json()["review"]
        conflict = admin.post(
            f"/billing/reports/flagged/{absurd['request_id']}/adjust", json={"amount_usd": "-1"}
        )
        assert (conflict.status_code, conflict.json()["error"]["code"]) == (409, "already_reviewed")

        still = admin.post(f"/billing/invoices/{invoice_id}/finalize")
        assert still.status_code == 409
        assert huge["request_id"] in still.json()["error"]["message"]
        assert absurd["request_id"] not in still.json()["error"]["message"]
        unreviewed = flagged(admin, period, account_id=str(account_id), unreviewed="true")
        assert [r["request_id"] for r in unreviewed["data"]] == [huge["request_id"]]

        credit = -huge["cost_usd"]
        adjusted = admin.post(
            f"/billing/reports/flagged/{huge['request_id']}/adjust",
            json={"amount_usd": str(credit), "note": "credited in full"},
        )
        assert adjusted.status_code == 200, adjusted.text
        review = adjusted.json()["review"]
        assert review["decision"] == "adjusted" and review["adjustment_request_id"]
        row = db.fetch(
            "SELECT kind, account_id, occurred_at, cost_usd, total_tokens FROM usage_ledger"
            " WHERE request_id = $1",
            review["adjustment_request_id"],
        )[0]
        assert row == {
            "kind": "adjustment",
            "account_id": account_id,
            "occurred_at": huge["occurred_at"],
            "cost_usd": credit,
            "total_tokens": 0,
        }

        finalized = admin.post(f"/billing/invoices/{invoice_id}/finalize")
        assert finalized.status_code == 200, finalized.text
        invoice = finalized.json()
        assert invoice["status"] == "finalized"
        adjustment_lines = [line for line in invoice["lines"] if line["kind"] == "adjustment"]
        assert [Decimal(line["amount_exact_usd"]) for line in adjustment_lines] == [credit]

    # Reviews are the admin's: a customer key reads its own flagged usage, changes nothing.
    own = httpx.get(
        f"{meterline.url}/billing/reports/flagged",
        params={"period": str(period)},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert own.status_code == 200 and len(own.json()["data"]) == 2
    forbidden = httpx.post(
        f"{meterline.url}/billing/reports/flagged/{absurd['request_id']}/accept",
        json={},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert forbidden.status_code == 404


def test_a_late_flagged_row_of_a_finalized_month_blocks_the_next_invoice(
    meterline: Meterline, db: Database, model: tuple[str, int]
) -> None:
    account_id, _ = meterline.customer()
    older, newer = months_ago(2), months_ago(1)
    insert_usage(db, priced_row(account_id, model, older.start + timedelta(days=1), 5))
    with meterline.admin() as admin:
        finalized = admin.post(f"/billing/invoices/{draft(admin, account_id, older)}/finalize")
        assert finalized.status_code == 200, finalized.text
        # Replayed from a spool after that: it goes on the next invoice, as late usage.
        late = priced_row(
            account_id, model, older.start + timedelta(days=2), 999, "implausible_count"
        )
        insert_usage(db, late)
        invoice_id = draft(admin, account_id, newer)
        refused = admin.post(f"/billing/invoices/{invoice_id}/finalize")
        assert refused.status_code == 409
        assert late["request_id"] in refused.json()["error"]["message"]
        admin.post(f"/billing/reports/flagged/{late['request_id']}/accept", json={})
        assert admin.post(f"/billing/invoices/{invoice_id}/finalize").status_code == 200


def test_review_input_is_validated(
    meterline: Meterline, db: Database, model: tuple[str, int]
) -> None:
    account_id, _ = meterline.customer()
    row = priced_row(account_id, model, months_ago(1).start, 50, "implausible_count")
    insert_usage(db, row)
    url = f"/billing/reports/flagged/{row['request_id']}"
    with meterline.admin() as admin:
        for path, body, param in [
            ("/accept", {"note": "bad\x00note"}, "body.note"),
            ("/adjust", {"amount_usd": "NaN"}, "body.amount_usd"),
            ("/adjust", {"amount_usd": "0.0000000000001"}, "body.amount_usd"),
            ("/adjust", {}, "body.amount_usd"),
        ]:
            response = admin.post(url + path, json=body)
            assert response.status_code == 422, response.text
            assert response.json()["error"]["param"] == param
        missing = admin.post(f"/billing/reports/flagged/{new_request_id()}/accept", json={})
        assert missing.status_code == 404
        assert (
            admin.get("/billing/reports/flagged", params={"period": "9999-12"}).status_code == 422
        )


def test_quarantined_rows_are_reported_and_counted(meterline: Meterline, db: Database) -> None:
    """A record no edge check caught (here: in a spool file an older version wrote) reaches
    the quarantine, and only it: the rest of its batch reaches the ledger."""
    account_id, _ = meterline.customer()
    good = [record(account_id, cost_usd=None, price_version_id=None) for _ in range(5)]
    bad = record(account_id, requested_model="nul\x00model", cost_usd=None, price_version_id=None)
    lines = b"\n".join(r.to_json() for r in [*good[:2], bad, *good[2:]]) + b"\n"
    spool = meterline.data_dir / "spool"
    name = f"{time.time_ns():020d}-1-000000.jsonl"
    (spool / f"{name}.tmp").write_bytes(lines)
    (spool / f"{name}.tmp").rename(spool / name)  # whole, as the spool writes its files

    with meterline.admin() as admin:
        deadline = time.monotonic() + 15
        while True:
            page = admin.get("/billing/reports/quarantine", params={"account_id": str(account_id)})
            assert page.status_code == 200, page.text
            if page.json()["data"] or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        [entry] = page.json()["data"]
        assert entry["request_id"] == bad.request_id
        assert (entry["source"], entry["sqlstate"], entry["account_id"]) == (
            "replay",
            "22P05",
            str(account_id),
        )
        assert LedgerRecord.from_json(entry["record"].encode()) == bad
    customer_key = meterline.new_key(account_id)
    hidden = httpx.get(
        f"{meterline.url}/billing/reports/quarantine",
        headers={"Authorization": f"Bearer {customer_key}"},
    )
    assert hidden.status_code == 404
    assert db.fetchval("SELECT count(*) FROM usage_ledger WHERE account_id = $1", account_id) == 5
    deadline = time.monotonic() + 5
    while quarantined_metric(meterline) < 1:
        assert time.monotonic() < deadline, "no quarantined rows in /metrics"
        time.sleep(0.2)


def quarantined_metric(meterline: Meterline) -> float:
    for family in text_string_to_metric_families(httpx.get(f"{meterline.url}/metrics").text):
        for sample in family.samples:
            if sample.name == "meterline_ledger_rows_total" and sample.labels == {
                "outcome": "quarantined"
            }:
                return sample.value
    return 0.0
