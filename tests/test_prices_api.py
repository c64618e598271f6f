"""`GET/POST /billing/prices` and the CLI's price tables, against `meterline serve`.

Models are named uniquely per test, so these tests share the run's server and database.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest

from pricing.cost import TokenUsage, usage_cost
from pricing.prices import Price
from tests.conftest import Meterline
from tests.support import ROOT, Database


def unique(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(4)}"


def test_anyone_reads_prices_and_only_the_admin_adds_them(meterline: Meterline) -> None:
    _, key = meterline.customer()
    with meterline.admin() as admin:
        listed = admin.get("/billing/prices", headers={"Authorization": f"Bearer {key}"})
        assert listed.status_code == 200
        v3 = [p for p in listed.json()["data"] if p["model"] == "deepseek-ai/DeepSeek-V3"]
        assert v3 and v3[0]["input_usd_per_mtok"] == "0.250000"
        assert v3[0]["source"] == "default"
        body = {"model": unique("x/"), "input_usd_per_mtok": "1", "output_usd_per_mtok": "1"}
        as_customer = admin.post(
            "/billing/prices", json=body, headers={"Authorization": f"Bearer {key}"}
        )
        assert as_customer.status_code == 404
        assert (
            admin.get("/billing/prices", headers={"Authorization": "Bearer nope"}).status_code
            == 401
        )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("input_usd_per_mtok", "0.1234567"),  # more decimals than stored: never rounded silently
        ("output_usd_per_mtok", "-1"),
        ("input_usd_per_mtok", "abc"),
        ("effective_from", "2026-01-01T00:00:00"),  # no offset
        ("model", ""),
        ("model", " padded"),
    ],
)
def test_a_bad_price_is_a_422_naming_the_field(
    meterline: Meterline, field: str, value: str
) -> None:
    body = {"model": unique("bad/"), "input_usd_per_mtok": "1", "output_usd_per_mtok": "1"}
    body[field] = value
    with meterline.admin() as admin:
        response = admin.post("/billing/prices", json=body)
    assert response.status_code == 422, response.text
    assert field in response.json()["error"]["param"]


def test_versions_are_added_never_edited_and_a_glob_prices_its_models(
    meterline: Meterline,
) -> None:
    family = unique("fam")
    start = datetime(2026, 1, 1, tzinfo=UTC)
    body: dict[str, Any] = {
        "model": f"{family}/*",
        "input_usd_per_mtok": "0.5",
        "output_usd_per_mtok": "1.5",
        "cached_input_usd_per_mtok": "0.05",
        "effective_from": start.isoformat(),
    }
    with meterline.admin() as admin:
        created = admin.post("/billing/prices", json=body)
        assert created.status_code == 201, created.text
        version = created.json()
        assert (version["input_usd_per_mtok"], version["cached_input_usd_per_mtok"]) == (
            "0.500000",
            "0.050000",
        )
        same = admin.post("/billing/prices", json=body)
        assert (same.status_code, same.json()["id"]) == (200, version["id"])
        other = admin.post("/billing/prices", json={**body, "output_usd_per_mtok": "9"})
        assert other.status_code == 409
        assert other.json()["error"]["code"] == "price_version_exists"

        exact = {**body, "model": f"{family}/big", "input_usd_per_mtok": "2"}
        exact["effective_from"] = (start + timedelta(days=10)).isoformat()
        assert admin.post("/billing/prices", json=exact).status_code == 201

        def lookup(model: str, at: datetime) -> Any:
            return admin.get(
                "/billing/prices/lookup", params={"model": model, "at": at.isoformat()}
            )

        assert lookup(f"{family}/big", start + timedelta(days=1)).json()["id"] == version["id"]
        assert (
            lookup(f"{family}/big", start + timedelta(days=11)).json()["model"] == f"{family}/big"
        )
        assert lookup(f"{family}/small", start + timedelta(days=11)).json()["id"] == version["id"]
        missing = lookup(f"{family}/small", start - timedelta(days=1))
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "unpriced_model"

        versions = admin.get("/billing/prices", params={"model": f"{family}/*"}).json()["data"]
        assert [v["id"] for v in versions] == [version["id"]]
        current = admin.get("/billing/prices", params={"current": "true"}).json()["data"]
        assert {f"{family}/*", f"{family}/big"} <= {v["model"] for v in current}


def _ledger_rows(db: Database, model: str, count: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 10
    while True:
        rows = db.fetch(
            "SELECT occurred_at, stream, cost_usd, price_version_id, prompt_tokens,"
            " completion_tokens, cached_tokens"
            " FROM usage_ledger WHERE requested_model = $1 ORDER BY occurred_at",
            model,
        )
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


def test_a_new_price_prices_the_next_request_at_once_and_no_past_row(
    meterline: Meterline, db: Database
) -> None:
    model = unique("unpriced/")  # routed to the mock provider; no price covers it yet
    _, key = meterline.customer()
    client = openai.OpenAI(base_url=meterline.v1, api_key=key, max_retries=0)
    messages: Any = [{"role": "user", "content": "Hello"}]
    client.chat.completions.create(model=model, messages=messages)
    (before,) = _ledger_rows(db, model, 1)
    assert (before["cost_usd"], before["price_version_id"]) == (None, None)

    # Backdated: it takes effect before the first request, which still keeps its NULL.
    body = {
        "model": model,
        "input_usd_per_mtok": "3",
        "output_usd_per_mtok": "7",
        "effective_from": (datetime.now(UTC) - timedelta(hours=1)).isoformat(),
    }
    with meterline.admin() as admin:
        created = admin.post("/billing/prices", json=body)
    assert created.status_code == 201
    client.chat.completions.create(model=model, messages=messages)
    first, second = _ledger_rows(db, model, 2)
    assert (first["cost_usd"], first["price_version_id"]) == (None, None)
    price = Price(model, Decimal(3), Decimal(7), datetime.now(UTC))
    usage = TokenUsage(
        second["prompt_tokens"], second["completion_tokens"], second["cached_tokens"]
    )
    assert second["price_version_id"] == created.json()["id"]
    assert second["cost_usd"] == usage_cost(usage, price)


def _cli(
    database_url: str, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        cwd=ROOT,
        env={**os.environ, "METERLINE_DATABASE_URL": database_url},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_price_tables_import_and_export_from_the_cli(
    fresh_database_url: str, tmp_path: Path
) -> None:
    table = tmp_path / "prices.yaml"
    table.write_text(
        "prices:\n"
        "  - model: acme/*\n"
        "    input_usd_per_mtok: 0.1\n"
        "    output_usd_per_mtok: 0.3\n"
        "    effective_from: 2026-02-01T00:00:00Z\n"
        "  - model: acme/turbo\n"
        "    usd_per_mtok: 2\n"
        "    cached_input_usd_per_mtok: 0.5\n"
        "    effective_from: 2026-03-01\n"
    )
    imported = _cli(fresh_database_url, "prices", "import", str(table))
    assert imported.returncode == 0, imported.stderr
    assert "imported 2 new versions" in imported.stderr
    again = _cli(fresh_database_url, "prices", "import", str(table))
    assert "imported 0 new versions, 2 already present" in again.stderr

    exported = _cli(fresh_database_url, "prices", "export", "--format", "csv")
    assert exported.returncode == 0, exported.stderr
    assert exported.stdout.splitlines() == [
        "model,input_usd_per_mtok,output_usd_per_mtok,cached_input_usd_per_mtok,effective_from",
        "acme/*,0.1,0.3,,2026-02-01T00:00:00Z",
        "acme/turbo,2,2,0.5,2026-03-01T00:00:00Z",
    ]

    conflicting = "model,input_usd_per_mtok,output_usd_per_mtok,effective_from\n"
    conflicting += "acme/*,9,9,2026-02-01T00:00:00Z\nnew/one,1,1,2026-02-01T00:00:00Z\n"
    refused = _cli(
        fresh_database_url, "prices", "import", "-", "--format", "csv", stdin=conflicting
    )
    assert refused.returncode == 1 and "acme/*" in refused.stderr
    models = Database(fresh_database_url).fetch("SELECT model FROM price_versions ORDER BY model")
    assert [r["model"] for r in models] == ["acme/*", "acme/turbo"]  # all or nothing

    bad = _cli(fresh_database_url, "prices", "import", "-", "-f", "csv", stdin="model\nm\n")
    assert bad.returncode == 1 and "entry 1" in bad.stderr


def test_invoices_from_the_cli(fresh_database_url: str) -> None:
    db = Database(fresh_database_url)
    account = db.fetchval(
        "INSERT INTO accounts (name, created_at) VALUES ('cli', '2026-01-01') RETURNING id"
    )
    version = db.fetchval(
        "INSERT INTO price_versions (model, input_usd_per_mtok, output_usd_per_mtok,"
        " effective_from) VALUES ('cli/m', 1, 1, '2020-01-01') RETURNING id"
    )
    db.execute("SELECT meterline_ensure_usage_partition('2026-02-01')")
    db.execute(
        "INSERT INTO usage_ledger (request_id, occurred_at, account_id, endpoint,"
        " requested_model, stream, status_code, prompt_tokens, completion_tokens, total_tokens,"
        " usage_source, cost_usd, price_version_id) VALUES ('req_cli', '2026-02-03', $1,"
        " 'chat', 'cli/m', false, 200, 1500000, 0, 1500000, 'upstream', 1.5, $2)",
        account,
        version,
    )
    rolled = _cli(fresh_database_url, "invoices", "rollup")
    assert rolled.returncode == 0 and "rolled up 1 ledger rows" in rolled.stderr
    generated = _cli(fresh_database_url, "invoices", "generate", "--period", "2026-02", "--json")
    assert generated.returncode == 0, generated.stderr
    summary = json.loads(generated.stdout)
    assert (summary["drafts"], summary["created"], summary["total_usd"]) == (1, 1, "1.50")

    invoice_id = str(db.fetchval("SELECT id FROM invoices WHERE account_id = $1", account))
    finalized = _cli(fresh_database_url, "invoices", "finalize", "--period", "2026-02", "--json")
    assert finalized.returncode == 0, finalized.stderr
    (final,) = json.loads(finalized.stdout)
    assert final["number"].endswith("-000001")

    assert final["id"] == invoice_id
    assert [line["amount_usd"] for line in final["lines"]] == ["1.50"]
    shown = _cli(fresh_database_url, "invoices", "show", invoice_id, "--json")
    assert json.loads(shown.stdout) == final
    voided = _cli(fresh_database_url, "invoices", "void", invoice_id, "--reason", "test", "--json")
    assert json.loads(voided.stdout)["void_reason"] == "test"
    unpriced = _cli(fresh_database_url, "invoices", "unpriced", "--period", "2026-02", "--json")
    assert json.loads(unpriced.stdout) == []


def test_a_stream_begun_before_a_new_price_is_priced_by_the_version_of_its_start(
    meterline: Meterline, db: Database
) -> None:
    """A stream begun before a new version's `effective_from` and finished after it keeps
    the old price, however many requests at the new price finished in between."""
    model = unique("unpriced/switch-")
    _, key = meterline.customer()
    client = openai.OpenAI(base_url=meterline.v1, api_key=key, max_retries=0)
    messages: Any = [{"role": "user", "content": "Hello"}]
    switch = datetime.now(UTC) + timedelta(seconds=3)
    with meterline.admin() as admin:
        old, new = (
            admin.post(
                "/billing/prices",
                json={
                    "model": model,
                    "input_usd_per_mtok": rate,
                    "output_usd_per_mtok": rate,
                    "effective_from": start.isoformat(),
                },
            ).json()
            for rate, start in (("1", switch - timedelta(hours=1)), ("5", switch))
        )
    # 40 chunks 100 ms apart: the stream ends about a second after the switch.
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        stream=True,
        extra_body={"mock": {"chunks": 40, "chunk_delay_ms": 100}},
    )
    after_switch = 0
    for _ in stream:
        # Requests at the new price finish while the stream runs, up to its last chunk.
        if datetime.now(UTC) >= switch + timedelta(milliseconds=50):
            client.chat.completions.create(model=model, messages=messages)
            after_switch += 1
    assert after_switch > 0, "the stream ended before the new price came into force"

    rows = _ledger_rows(db, model, after_switch + 1)
    streamed = [r for r in rows if r["stream"]]
    plain = [r for r in rows if not r["stream"]]
    assert len(streamed) == 1 and len(plain) == after_switch
    assert streamed[0]["occurred_at"] < switch
    for row, price in [(streamed[0], old), *((r, new) for r in plain)]:
        assert row["price_version_id"] == price["id"]
        usage = TokenUsage(row["prompt_tokens"], row["completion_tokens"], row["cached_tokens"])
        rate = Decimal(price["input_usd_per_mtok"])
        assert row["cost_usd"] == usage_cost(usage, Price(model, rate, rate, switch))
