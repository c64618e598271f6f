"""Invoice PDFs from `GET /billing/invoices/{id}/pdf`: the text a customer's finance team
reads (extracted with pypdf) carries every line amount and the total of the invoice's JSON,
the issuer from the settings, and says so when the invoice is a draft or void."""

from __future__ import annotations

import io
import re
import secrets
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest
from pypdf import PdfReader

from service.invoices.pdf import Issuer, render_invoice_pdf
from service.invoices.schemas import InvoiceLineOut, InvoiceOut
from tests.conftest import Meterline, Upstream, _clone, _with_database, start_meterline
from tests.support import Database
from tests.usage_rows import insert_usage, usage_row

ISSUER = "Meterline Test Issuer Ltd"
ADDRESS = ["1 Long Street", "London EC1A 1AA", "United Kingdom"]


@pytest.fixture(scope="module")
def server(
    postgres_server: str,
    template_database: str,
    upstream: Upstream,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Meterline]:
    admin, name = _clone(postgres_server, template_database)
    url = _with_database(postgres_server, name)
    try:
        with start_meterline(
            url,
            upstream,
            tmp_path_factory.mktemp("pdf"),
            METERLINE_INVOICE_ISSUER_NAME=ISSUER,
            METERLINE_INVOICE_ISSUER_ADDRESS=str(ADDRESS).replace("'", '"'),
            METERLINE_INVOICE_ISSUER_TAX_ID="GB999 9999 73",
        ) as meterline:
            yield meterline
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def text_of(pdf: bytes) -> str:
    reader = PdfReader(io.BytesIO(pdf))
    return re.sub(r"[ \t]+", " ", "\n".join(page.extract_text() for page in reader.pages))


def printed(value: str) -> str:
    return f"{Decimal(value):,.2f}"


@pytest.fixture(scope="module")
def invoice(server: Meterline) -> dict[str, Any]:
    """A draft of last month for an account with usage on 40 priced models (many lines,
    some rounding up and some down) and one model without a price."""
    account = server.new_account(name=f"Zürich Analytics AG {secrets.token_hex(2)}")
    when = (datetime.now(UTC).replace(day=1) - timedelta(days=3)).replace(hour=9)
    period = f"{when:%Y-%m}"
    with server.admin() as api:
        rows = []
        for m in range(40):
            model = f"pdf-model-{m:02d}"
            price = api.post(
                "/billing/prices",
                json={
                    "model": model,
                    "input_usd_per_mtok": f"{m + 1}.125",
                    "output_usd_per_mtok": f"{3 * m + 2}.5",
                    "effective_from": "2020-01-01T00:00:00Z",
                },
            ).json()
            prompt, completion = 1000 * (m + 1) + 7, 333 * (m + 2)
            cost = (
                Decimal(prompt) * Decimal(price["input_usd_per_mtok"])
                + Decimal(completion) * Decimal(price["output_usd_per_mtok"])
            ) / Decimal(1_000_000)
            rows.append(
                usage_row(
                    str(account["id"]),
                    when,
                    model=model,
                    prompt=prompt,
                    completion=completion,
                    cost=cost,
                )
            )
        insert_usage(Database(server.database_url), *rows)
        created = api.post(
            "/billing/invoices", json={"account_id": account["id"], "period": period}
        )
        assert created.status_code == 201, created.text
        body: dict[str, Any] = created.json()
    body["account_name"] = account["name"]
    return body


def pdf(server: Meterline, invoice_id: str, token: str | None = None) -> httpx.Response:
    with server.admin() as api:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return api.get(f"/billing/invoices/{invoice_id}/pdf", headers=headers)


def test_the_pdf_carries_every_line_amount_and_the_total_of_the_json(
    server: Meterline, invoice: dict[str, Any]
) -> None:
    response = pdf(server, invoice["id"])
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/pdf"
    assert "attachment" in response.headers["content-disposition"]
    text = text_of(response.content)
    assert len(invoice["lines"]) == 40
    for line in invoice["lines"]:
        assert printed(line["amount_usd"]) in text, line
        assert f"{line['quantity']:,}" in text
        assert line["model"] in text
    amounts = re.findall(r"^(?:.* )?(\d[\d,]*\.\d\d)$", text, flags=re.MULTILINE)
    assert Decimal(invoice["total_usd"]) == sum(Decimal(a["amount_usd"]) for a in invoice["lines"])
    assert f"Total (USD) {printed(invoice['total_usd'])}" in text
    assert amounts, "no amounts found"
    assert "rounded once, to the cent, half away from zero" in text
    for fact in (ISSUER, *ADDRESS, "Tax ID: GB999 9999 73", invoice["account_name"]):
        assert fact in text
    assert "DRAFT INVOICE" in text and invoice["period"] in text


def test_a_finalized_invoice_prints_its_number_and_a_void_one_says_void(
    server: Meterline, invoice: dict[str, Any]
) -> None:
    with server.admin() as api:
        final = api.post(f"/billing/invoices/{invoice['id']}/finalize")
        assert final.status_code == 200, final.text
        number = final.json()["number"]
        text = text_of(pdf(server, invoice["id"]).content)
        assert number in text and "DRAFT" not in text and "INVOICE" in text
        assert pdf(server, invoice["id"]).headers["content-disposition"].endswith(f'{number}.pdf"')
        api.post(f"/billing/invoices/{invoice['id']}/void", json={"reason": "issued twice"})
    text = text_of(pdf(server, invoice["id"]).content)
    assert "VOID INVOICE" in text and "issued twice" in text and number in text


def test_a_customer_key_gets_its_own_pdf_and_a_404_for_another_accounts(
    server: Meterline, invoice: dict[str, Any]
) -> None:
    _, stranger = server.customer()
    owner_key = server.new_key(invoice["account_id"])
    assert pdf(server, invoice["id"], owner_key).status_code == 200
    other = pdf(server, invoice["id"], stranger)
    missing = pdf(server, str(uuid.uuid4()), stranger)
    assert other.status_code == missing.status_code == 404
    assert other.json()["error"]["code"] == missing.json()["error"]["code"] == "not_found"
    assert pdf(server, invoice["id"], "ml-" + "x" * 40).status_code == 401


def test_a_thousand_line_invoice_renders_quickly() -> None:
    """Printed, not asserted (timing depends on the machine): the figure goes in the notes."""
    now = datetime.now(UTC)
    lines = [
        InvoiceLineOut(
            kind="tokens",
            description=f"vendor/model-{i:04d}, 123,456 prompt + 7,890 completion tokens in"
            " 321 requests at $0.4 input / $0.8 output per 1M tokens",
            model=f"vendor/model-{i:04d}",
            task_type=None,
            period=None,
            price_version_id=i,
            quantity=321,
            prompt_tokens=123_456,
            completion_tokens=7_890,
            cached_tokens=0,
            input_usd_per_mtok=Decimal("0.4"),
            output_usd_per_mtok=Decimal("0.8"),
            cached_input_usd_per_mtok=None,
            unit_price_usd=None,
            amount_exact_usd=Decimal("0.055694400000"),
            amount_usd=Decimal("0.06"),
        )
        for i in range(1000)
    ]
    invoice = InvoiceOut(
        id=uuid.uuid4(),
        number="INV-2026-000001",
        account_id=uuid.uuid4(),
        period="2026-11",
        status="finalized",
        currency="USD",
        lines=lines,
        total_usd=Decimal("60.00"),
        total_exact_usd=Decimal("55.694400000000"),
        credit_notes=[],
        credited_usd=Decimal("0.00"),
        amount_due_usd=Decimal("60.00"),
        usage_cutoff=now,
        unpriced_usage=[],
        created_at=now,
        updated_at=now,
        finalized_at=now,
        voided_at=None,
        void_reason=None,
    )
    issuer = Issuer("Meterline", ("1 Street",), None)
    render_invoice_pdf(invoice, "warm-up", issuer)
    began = time.perf_counter()
    document = render_invoice_pdf(invoice, "Customer", issuer)
    seconds = time.perf_counter() - began
    pages = len(PdfReader(io.BytesIO(document)).pages)
    print(f"\n1,000-line invoice PDF: {seconds:.2f} s, {pages} pages, {len(document):,} bytes")
    assert text_of(document).count("0.06") >= 1000
