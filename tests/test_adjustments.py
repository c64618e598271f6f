"""Adjustments and credit notes through the billing API: exact money, idempotent retries,
the invoice each belongs on, and no cent appearing or vanishing between the invoice, its
credit notes and the monthly export."""

from __future__ import annotations

import asyncio
import csv
import io
import re
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pricing.invoice import BillingPeriod
from pricing.money import round_cents
from tests.conftest import ADMIN_TOKEN, Meterline
from tests.support import Database
from tests.test_invoice_pdf import text_of
from tests.test_review import draft, months_ago


def adjust(
    admin: httpx.Client,
    account_id: object,
    amount: str,
    at: datetime | None = None,
    key: str | None = None,
    reason: str = "goodwill",
) -> httpx.Response:
    body: dict[str, Any] = {"amount_usd": amount, "reason": reason}
    if at is not None:
        body["occurred_at"] = at.isoformat()
    headers = {"Idempotency-Key": key} if key else {}
    return admin.post(f"/billing/accounts/{account_id}/adjustments", json=body, headers=headers)


def finalize(admin: httpx.Client, invoice_id: str) -> dict[str, Any]:
    response = admin.post(f"/billing/invoices/{invoice_id}/finalize")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def credit(admin: httpx.Client, invoice_id: str, amount: str, **more: Any) -> httpx.Response:
    return admin.post(
        f"/billing/invoices/{invoice_id}/credit-notes",
        json={"amount_usd": amount, "reason": "service credit", **more},
    )


def adjustment_rows(db: Database, account_id: object) -> list[dict[str, Any]]:
    return db.fetch(
        "SELECT request_id, cost_usd, occurred_at FROM usage_ledger"
        " WHERE account_id = $1 AND kind = 'adjustment' ORDER BY recorded_at",
        account_id,
    )


def monthly(admin: httpx.Client, period: BillingPeriod, account_id: object, fmt: str) -> Any:
    response = admin.get(
        "/billing/reports/monthly",
        params={"period": str(period), "format": fmt, "account_id": str(account_id)},
    )
    assert response.status_code == 200, response.text
    if fmt == "json":
        return response.json()
    return list(csv.DictReader(io.StringIO(response.text)))


def test_the_same_idempotency_key_twice_creates_one_adjustment(
    meterline: Meterline, db: Database
) -> None:
    account_id = meterline.new_account()["id"]
    with meterline.admin() as admin:
        first = adjust(admin, account_id, "-12.345678901234", key="retry-1")
        assert first.status_code == 201, first.text
        again = adjust(admin, account_id, "-12.345678901234", key="retry-1")
        assert again.status_code == 201 and again.json() == first.json()
        rows = adjustment_rows(db, account_id)
        assert [(r["request_id"], r["cost_usd"]) for r in rows] == [
            (first.json()["id"], Decimal("-12.345678901234"))
        ]
        assert first.json()["amount_usd"] == "-12.345678901234"

        # The same key with another body is refused, and adds nothing.
        other = adjust(admin, account_id, "-12.34567890123", key="retry-1")
        assert other.status_code == 409, other.text
        assert other.json()["error"]["code"] == "idempotency_key_reused"
        # The same body under another account is another request too.
        elsewhere = meterline.new_account()["id"]
        assert adjust(admin, elsewhere, "-12.345678901234", key="retry-1").status_code == 409
        # Without a key, a second identical request is a second adjustment.
        assert adjust(admin, account_id, "1").status_code == 201
        assert adjust(admin, account_id, "1").status_code == 201
        assert len(adjustment_rows(db, account_id)) == 3

        # The adjustment is a ledger row like any other: in the usage events.
        events = admin.get("/billing/usage/events", params={"account_id": str(account_id)})
        assert events.status_code == 200, events.text
        kinds = {(e["kind"], e["cost_usd"]) for e in events.json()["data"]}
        assert ("adjustment", "-12.345678901234") in kinds

    async def concurrent() -> list[httpx.Response]:
        async with httpx.AsyncClient(
            base_url=meterline.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
        ) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        f"/billing/accounts/{account_id}/adjustments",
                        json={"amount_usd": "5.00", "reason": "at once"},
                        headers={"Idempotency-Key": "burst"},
                    )
                    for _ in range(8)
                )
            )

    answers = asyncio.run(concurrent())
    assert {r.status_code for r in answers} == {201}
    assert len({r.json()["id"] for r in answers}) == 1
    assert len(adjustment_rows(db, account_id)) == 4


def test_bad_adjustments_are_4xx(meterline: Meterline) -> None:
    account_id = meterline.new_account()["id"]
    future = datetime.now(UTC) + timedelta(days=2)
    with meterline.admin() as admin:
        for amount in ("abc", "1.0000000000001", "0", "NaN", "Infinity", "1e400", ""):
            response = adjust(admin, account_id, amount)
            assert response.status_code == 422, (amount, response.text)
            assert response.json()["error"]["param"] == "body.amount_usd", response.text
        assert adjust(admin, account_id, "1", at=future).status_code == 422
        assert adjust(admin, account_id, "1", reason="").status_code == 422
        missing = adjust(admin, uuid.uuid4(), "1")
        assert missing.status_code == 404 and missing.json()["error"]["param"] == "path.account_id"
        assert adjust(admin, "not-a-uuid", "1").status_code == 422
        long_key = adjust(admin, account_id, "1", key="k" * 256)
        assert long_key.status_code == 422, long_key.text
    # Admin only: a customer key cannot credit its own account.
    _, key = meterline.customer()
    with httpx.Client(base_url=meterline.url, headers={"Authorization": f"Bearer {key}"}) as own:
        refused = own.post(
            f"/billing/accounts/{account_id}/adjustments",
            json={"amount_usd": "-1", "reason": "free money"},
        )
        assert refused.status_code == 404


def test_an_adjustment_bills_on_its_months_invoice_or_late_on_the_next(
    meterline: Meterline,
) -> None:
    account_id = meterline.new_account()["id"]
    earlier, later = months_ago(3), months_ago(2)
    with meterline.admin() as admin:
        assert adjust(admin, account_id, "10.005", at=earlier.start + timedelta(days=1)).is_success
        invoice = finalize(admin, draft(admin, uuid.UUID(str(account_id)), earlier))
        assert [(line["kind"], line["amount_usd"]) for line in invoice["lines"]] == [
            ("adjustment", "10.01")
        ]
        assert invoice["lines"][0]["amount_exact_usd"] == "10.005000000000"
        # Its month is finalized: a new adjustment of it is late, on the next invoice.
        late = adjust(admin, account_id, "-2.50", at=earlier.start + timedelta(days=2))
        assert late.status_code == 201 and late.json()["period"] == str(earlier)
        assert adjust(admin, account_id, "1.25", at=later.start + timedelta(days=1)).is_success
        next_one = admin.get(f"/billing/invoices/{draft(admin, uuid.UUID(str(account_id)), later)}")
        lines = {(x["kind"], x["period"], x["amount_usd"]) for x in next_one.json()["lines"]}
        assert lines == {("late_usage", str(earlier), "-2.50"), ("adjustment", None, "1.25")}
        assert next_one.json()["total_usd"] == "-1.25"
        # The finalized invoice did not change.
        again = admin.get(f"/billing/invoices/{invoice['id']}").json()
        assert again["total_usd"] == "10.01" and again["lines"] == invoice["lines"]


def test_credit_notes_against_a_finalized_invoice(meterline: Meterline) -> None:
    account_id = meterline.new_account()["id"]
    period = months_ago(4)
    with meterline.admin() as admin:
        assert adjust(admin, account_id, "100", at=period.start + timedelta(days=1)).is_success
        invoice_id = draft(admin, uuid.UUID(str(account_id)), period)
        draft_refused = credit(admin, invoice_id, "1.00")
        assert draft_refused.status_code == 409, draft_refused.text
        assert draft_refused.json()["error"]["code"] == "invoice_not_finalized"
        finalize(admin, invoice_id)

        first = credit(
            admin,
            invoice_id,
            "30.00",
            lines=[
                {"description": "outage 11-03", "amount_usd": "20.00"},
                {"description": "slow responses", "amount_usd": "10.00"},
            ],
        )
        assert first.status_code == 201, first.text
        note = first.json()
        assert re.fullmatch(rf"CN-{datetime.now(UTC).year}-\d{{6}}", note["number"])
        assert [line["amount_usd"] for line in note["lines"]] == ["20.00", "10.00"]
        shown = admin.get(f"/billing/invoices/{invoice_id}").json()
        assert (shown["total_usd"], shown["credited_usd"], shown["amount_due_usd"]) == (
            "100.00",
            "30.00",
            "70.00",
        )
        assert [n["number"] for n in shown["credit_notes"]] == [note["number"]]
        assert shown["status"] == "finalized" and shown["lines"][0]["amount_usd"] == "100.00"

        too_much = credit(admin, invoice_id, "70.01")
        assert too_much.status_code == 409 and (
            too_much.json()["error"]["code"] == "credit_exceeds_invoice"
        )
        for bad in (
            {"amount_usd": "0"},
            {"amount_usd": "-5"},
            {"amount_usd": "1.001"},
            {"amount_usd": "x"},
            {"amount_usd": "5", "lines": [{"description": "a", "amount_usd": "4"}]},
            {"amount_usd": "5", "lines": []},
        ):
            answer = admin.post(
                f"/billing/invoices/{invoice_id}/credit-notes", json={"reason": "r", **bad}
            )
            assert answer.status_code == 422, (bad, answer.text)
        assert credit(admin, str(uuid.uuid4()), "1").status_code == 404

        # The PDF lists the credit note and what remains due; the export carries both.
        pdf = text_of(admin.get(f"/billing/invoices/{invoice_id}/pdf").content)
        assert note["number"] in pdf and "-30.00" in pdf and "Amount due" in pdf and "70.00" in pdf
        report = monthly(admin, period, account_id, "json")
        assert report["data"][0]["invoice_credited_usd"] == "30.00"
        assert report["data"][0]["invoice_amount_due_usd"] == "70.00"
        assert report["totals"]["invoice_amount_due_usd"] == "70.00"
        rows = monthly(admin, period, account_id, "csv")
        assert rows[0]["invoice_credited_usd"] == "30.00"
        assert rows[0]["invoice_amount_due_usd"] == "70.00"

    # Concurrent credit notes cannot together exceed what remains: 12 x 10.00 against 70.00.
    async def at_once() -> list[httpx.Response]:
        async with httpx.AsyncClient(
            base_url=meterline.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
        ) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        f"/billing/invoices/{invoice_id}/credit-notes",
                        json={"amount_usd": "10.00", "reason": f"part {i}"},
                    )
                    for i in range(12)
                )
            )

    answers = asyncio.run(at_once())
    assert sorted(r.status_code for r in answers) == [201] * 7 + [409] * 5
    numbers = sorted(int(r.json()["number"][-6:]) for r in answers if r.status_code == 201)
    first_number = int(note["number"][-6:])
    # Gapless: the seven notes took the seven numbers after the first note's.
    assert numbers == list(range(first_number + 1, first_number + 8))
    with meterline.admin() as admin:
        shown = admin.get(f"/billing/invoices/{invoice_id}").json()
        assert (shown["credited_usd"], shown["amount_due_usd"]) == ("100.00", "0.00")
        assert credit(admin, invoice_id, "0.01").status_code == 409
        # Void: no more credit notes.
        assert admin.post(f"/billing/invoices/{invoice_id}/void", json={"reason": "x"}).is_success
        voided = credit(admin, invoice_id, "0.01")
        assert voided.status_code == 409 and voided.json()["error"]["code"] == (
            "invoice_not_finalized"
        )


AMOUNTS = st.decimals(
    min_value=Decimal("-50"), max_value=Decimal("500"), places=12, allow_nan=False
).filter(lambda d: d != 0)
CREDITS = st.decimals(min_value=Decimal("0.01"), max_value=Decimal("300"), places=2)


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(adjustments=st.lists(AMOUNTS, min_size=1, max_size=5), credits=st.lists(CREDITS, max_size=5))
def test_no_cent_appears_or_vanishes(
    meterline: Meterline, adjustments: list[Decimal], credits: list[Decimal]
) -> None:
    account_id = meterline.new_account()["id"]
    period = months_ago(5)
    with meterline.admin() as admin:
        for i, amount in enumerate(adjustments):
            at = period.start + timedelta(hours=i + 1)
            assert adjust(admin, account_id, str(amount), at=at).status_code == 201
        invoice = finalize(admin, draft(admin, uuid.UUID(str(account_id)), period))
        # One adjustment line: rounded once, from the exact sum.
        exact = sum(adjustments, Decimal(0))
        assert Decimal(invoice["total_usd"]) == round_cents(exact)
        assert Decimal(invoice["total_exact_usd"]) == exact

        remaining = Decimal(invoice["total_usd"])
        accepted = Decimal(0)
        for amount in credits:
            answer = credit(admin, invoice["id"], str(amount))
            if amount <= remaining:
                assert answer.status_code == 201, answer.text
                remaining -= amount
                accepted += amount
            else:
                assert answer.status_code == 409, answer.text
        shown = admin.get(f"/billing/invoices/{invoice['id']}").json()
        total, credited, due = (
            Decimal(shown[k]) for k in ("total_usd", "credited_usd", "amount_due_usd")
        )
        assert credited == accepted == sum(Decimal(n["amount_usd"]) for n in shown["credit_notes"])
        assert total - credited == due == remaining
        assert due >= 0 or not shown["credit_notes"]

        # The export reconciles with the invoice, to the cent and to the last decimal.
        report = monthly(admin, period, account_id, "json")
        assert Decimal(report["totals"]["billed_usd"]) == exact
        assert Decimal(report["totals"]["invoice_total_usd"]) == total
        assert Decimal(report["totals"]["invoice_credited_usd"]) == credited
        assert Decimal(report["totals"]["invoice_amount_due_usd"]) == due
