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
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest

from pricing.cost import TokenUsage, usage_cost
from pricing.prices import Price
from tests.conftest import ADMIN_TOKEN, Meterline, Upstream, start_meterline
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
    """A direct-database command, on `database_url`."""
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        cwd=ROOT,
        env={**os.environ, "METERLINE_DATABASE_URL": database_url},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _client(
    server: Meterline, *args: str, token: str = ADMIN_TOKEN
) -> subprocess.CompletedProcess[str]:
    """An API-client command, against `server`; no database URL to fall back on."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERLINE_")}
    return subprocess.run(
        [sys.executable, "-m", "service", *args, "--url", server.url, "--token", token],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, (result.returncode, result.stderr)
    assert lines[0].startswith("error: ")
    return lines[0]


def test_price_tables_import_and_export_from_the_cli(meterline: Meterline, tmp_path: Path) -> None:
    vendor = unique("acme")
    table = tmp_path / "prices.yaml"
    table.write_text(
        "prices:\n"
        f"  - model: {vendor}/*\n"
        "    input_usd_per_mtok: 0.1\n"
        "    output_usd_per_mtok: 0.3\n"
        "    effective_from: 2026-02-01T00:00:00Z\n"
        f"  - model: {vendor}/turbo\n"
        "    usd_per_mtok: 2\n"
        "    cached_input_usd_per_mtok: 0.5\n"
        "    effective_from: 2026-03-01\n"
    )
    imported = _cli(meterline.database_url, "prices", "import", str(table))
    assert imported.returncode == 0, imported.stderr
    assert "imported 2 new versions" in imported.stderr
    again = _cli(meterline.database_url, "prices", "import", str(table))
    assert "imported 0 new versions, 2 already present" in again.stderr

    exported = _client(meterline, "prices", "export", "--format", "csv")
    assert exported.returncode == 0, exported.stderr
    lines = exported.stdout.splitlines()
    assert lines[0] == (
        "model,input_usd_per_mtok,output_usd_per_mtok,cached_input_usd_per_mtok,effective_from"
    )
    assert [line for line in lines if line.startswith(vendor)] == [
        f"{vendor}/*,0.1,0.3,,2026-02-01T00:00:00Z",
        f"{vendor}/turbo,2,2,0.5,2026-03-01T00:00:00Z",
    ]
    # Read back, the export adds nothing: every version it lists is already there.
    whole = _cli(
        meterline.database_url, "prices", "import", "-", "-f", "csv", stdin=exported.stdout
    )
    assert whole.returncode == 0, whole.stderr
    assert f"imported 0 new versions, {len(lines) - 1} already present" in whole.stderr

    conflicting = "model,input_usd_per_mtok,output_usd_per_mtok,effective_from\n"
    conflicting += f"{vendor}/*,9,9,2026-02-01T00:00:00Z\n{vendor}/new,1,1,2026-02-01T00:00:00Z\n"
    refused = _cli(
        meterline.database_url, "prices", "import", "-", "--format", "csv", stdin=conflicting
    )
    assert refused.returncode == 1 and f"{vendor}/*" in refused.stderr
    models = Database(meterline.database_url).fetch(
        "SELECT model FROM price_versions WHERE model LIKE $1 ORDER BY model", f"{vendor}/%"
    )
    assert [r["model"] for r in models] == [f"{vendor}/*", f"{vendor}/turbo"]  # all or nothing

    bad = _cli(meterline.database_url, "prices", "import", "-", "-f", "csv", stdin="model\nm\n")
    assert bad.returncode == 1 and "entry 1" in bad.stderr


def test_prices_export_is_any_callers_and_a_refusal_is_one_line(
    meterline: Meterline, tmp_path: Path
) -> None:
    _, key = meterline.customer()
    as_customer = _client(meterline, "prices", "export", "-f", "yaml", token=key)
    assert as_customer.returncode == 0, as_customer.stderr
    assert "model: deepseek-ai/DeepSeek-V3" in as_customer.stdout

    output = tmp_path / "prices.csv"
    refused = _client(meterline, "prices", "export", "-o", str(output), token="ml-not-a-key")
    assert "[HTTP 401]" in _one_line_error(refused)
    assert not output.exists()


def test_invoices_from_the_cli(fresh_database_url: str, upstream: Upstream, tmp_path: Path) -> None:
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
    # Straight to the database: no server needed (and none rolling the row up first).
    rolled = _cli(fresh_database_url, "invoices", "rollup")
    assert rolled.returncode == 0 and "rolled up 1 ledger rows" in rolled.stderr
    generated = _cli(fresh_database_url, "invoices", "generate", "--period", "2026-02", "--json")
    assert generated.returncode == 0, generated.stderr
    summary = json.loads(generated.stdout)
    assert (summary["drafts"], summary["created"], summary["total_usd"]) == (1, 1, "1.50")
    invoice_id = str(db.fetchval("SELECT id FROM invoices WHERE account_id = $1", account))

    with start_meterline(fresh_database_url, upstream, tmp_path / "server") as server:
        finalized = _client(server, "invoices", "finalize", "--period", "2026-02", "--json")
        assert finalized.returncode == 0, finalized.stderr
        (final,) = json.loads(finalized.stdout)
        assert final["number"].endswith("-000001")
        assert final["id"] == invoice_id
        assert [line["amount_usd"] for line in final["lines"]] == ["1.50"]

        shown = _client(server, "invoices", "show", invoice_id, "--json")
        assert json.loads(shown.stdout) == final
        table = _client(server, "invoices", "show", invoice_id)
        assert table.returncode == 0 and final["number"] in table.stdout
        voided = _client(server, "invoices", "void", invoice_id, "--reason", "test", "--json")
        assert json.loads(voided.stdout)["void_reason"] == "test"
        unpriced = _client(server, "invoices", "unpriced", "--period", "2026-02", "--json")
        assert json.loads(unpriced.stdout) == []
        nothing = _client(server, "invoices", "finalize", "--period", "2026-02")
        assert nothing.returncode == 0 and "nothing to finalize" in nothing.stderr


def test_invoice_commands_answer_the_apis_refusals_in_one_line(meterline: Meterline) -> None:
    missing = str(uuid.uuid4())
    finalized = _client(meterline, "invoices", "finalize", missing)
    line = _one_line_error(finalized)
    assert line.startswith(f"error: {missing} not finalized: invoice {missing} not found")
    assert line.endswith("[HTTP 404]")
    assert _one_line_error(_client(meterline, "invoices", "show", missing)).endswith("[HTTP 404]")

    # A customer key reads its own account's invoices, and nothing more.
    account, key = meterline.customer()
    with meterline.admin() as admin:
        draft = admin.post(
            "/billing/invoices", json={"account_id": str(account), "period": "2026-01"}
        )
        assert draft.status_code == 201, draft.text
    invoice_id = draft.json()["id"]
    shown = _client(meterline, "invoices", "show", invoice_id, "--json", token=key)
    assert shown.returncode == 0 and json.loads(shown.stdout)["id"] == invoice_id
    for admin_only in (
        ["invoices", "finalize", invoice_id],
        ["invoices", "void", invoice_id, "--reason", "mine"],
    ):
        # Admin-only routes do not exist for a customer key.
        refused = _client(meterline, *admin_only, token=key)
        assert _one_line_error(refused).endswith("not found [HTTP 404]"), admin_only
    with meterline.admin() as admin:
        after = admin.get(f"/billing/invoices/{invoice_id}").json()
    assert (after["status"], after["number"]) == ("draft", None)


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
