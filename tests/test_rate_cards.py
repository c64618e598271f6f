"""Rate cards and provider costs end to end: two accounts on two rate cards call a real
`meterline serve` through the `openai` SDK; each ledger row stores what the customer is
charged and what the upstream charged; invoices bill tokens x the account's own rates; the
margin report matches an independent computation to the last decimal; a new rate-card
version dated in the past changes no stored row and no finalized invoice.

The expected figures are computed here from the ledger's token counts and the rates this
test chose, never from the service's own functions. On a database of its own (invoice
numbers are global).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import openai
import pytest

from pricing.invoice import BillingPeriod
from pricing.money import round_cents
from service.db.engine import create_engine, session_factory
from service.provider_costs.service import seed_provider_costs
from service.providers.config import ProvidersFileError, load_providers, parse_providers
from tests.conftest import ADMIN_TOKEN, Upstream
from tests.reliability import wait_for_rows
from tests.support import ROOT
from tests.test_invoices import Billing, Row, billing_server, exact_sum, month

MILLION = Decimal(1_000_000)
LONG_AGO = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def billing(
    postgres_server: str,
    template_database: str,
    upstream: Upstream,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Billing]:
    workdir = tmp_path_factory.mktemp("rate-cards")
    with billing_server(postgres_server, template_database, upstream, workdir) as billing:
        yield billing


def rate(value: Decimal, markup_pct: Decimal) -> Decimal:
    """A marked-up $/M rate as the README states it: rounded half up to 6 decimals."""
    return (value * (1 + markup_pct / 100)).quantize(Decimal("0.000001"), rounding=ROUND_HALF_UP)


def cost(row: dict[str, Any], rates: tuple[Decimal, Decimal]) -> Decimal:
    prompt, completion = int(row["prompt_tokens"]), int(row["completion_tokens"])
    return (prompt * rates[0] + completion * rates[1]) / MILLION


def post(billing: Billing, path: str, body: dict[str, Any], status: int = 201) -> Any:
    response = billing.admin.post(path, json=body)
    assert response.status_code == status, response.text
    return response.json()


def chat(billing: Billing, key: str, model: str, n: int) -> None:
    client = openai.OpenAI(base_url=billing.server.v1, api_key=key, max_retries=0)
    for i in range(n):
        client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": f"count to {i + 3}, please " * (i + 1)}],
            max_tokens=20 + i,
        )


def meterline_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`meterline …` as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=180,
        check=True,
    )


def ledger(billing: Billing, account: uuid.UUID) -> list[dict[str, Any]]:
    return billing.db.fetch(
        "SELECT request_id, requested_model, prompt_tokens, completion_tokens, cost_usd,"
        " provider_cost_usd, price_version_id, rate_card_version_id, provider_cost_version_id"
        " FROM usage_ledger WHERE account_id = $1 ORDER BY request_id",
        account,
    )


def test_two_rate_cards_bill_their_own_rates_and_the_margin_is_exact(billing: Billing) -> None:
    tag = secrets.token_hex(3)
    x, y, z = f"mock-x-{tag}", f"mock-y-{tag}", f"mock-z-{tag}"
    listed = {x: ("0.400000", "0.800000"), y: ("0.300000", "0.300000"), z: ("2", "3")}
    for model, (i, o) in listed.items():
        billing.price(model, i, o, LONG_AGO)
    # What the upstream `mock` charges: known for x and y, unknown for z.
    upstream_cost = {x: (Decimal("0.123457"), Decimal("0.2")), y: (Decimal("0.1"), Decimal("0.15"))}
    for model, (cost_in, cost_out) in upstream_cost.items():
        body = {"provider": "mock", "model": model, "input_usd_per_mtok": str(cost_in)}
        body |= {"output_usd_per_mtok": str(cost_out), "effective_from": LONG_AGO.isoformat()}
        assert post(billing, "/billing/provider-costs", body)["provider"] == "mock"

    markup = post(
        billing,
        "/billing/rate-cards",
        {
            "name": f"plus-25-{tag}",
            "markup_pct": "25",
            "markup_basis": "provider_cost",
            "effective_from": LONG_AGO.isoformat(),
        },
    )
    negotiated = post(
        billing,
        "/billing/rate-cards",
        {
            "name": f"negotiated-{tag}",
            "markup_basis": "list_price",
            "rates": [{"model": x, "input_usd_per_mtok": "0.35", "output_usd_per_mtok": "0.5"}],
            "effective_from": LONG_AGO.isoformat(),
        },
    )
    assert markup["versions"][0]["markup_pct"] == "25.0000"
    since = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    a = uuid.UUID(str(billing.server.new_account(rate_card_id=markup["id"])["id"]))
    b_account = billing.server.new_account(
        rate_card_id=negotiated["id"], rate_card_effective_from=since
    )
    b = uuid.UUID(str(b_account["id"]))
    assert b_account["rate_card_id"] == negotiated["id"]
    key_a, key_b = billing.server.new_key(a), billing.server.new_key(b)
    chat(billing, key_a, x, 3)
    chat(billing, key_a, y, 2)
    chat(billing, key_b, x, 2)
    chat(billing, key_b, y, 2)
    chat(billing, key_b, z, 2)
    for account, n in ((a, 5), (b, 6)):
        sql = "SELECT count(*) FROM usage_ledger WHERE account_id = $1"
        assert wait_for_rows(billing.db, sql, account, count=n) == n

    # The customer's rates, computed here.
    a_rates = {
        m: (rate(i, Decimal(25)), rate(o, Decimal(25))) for m, (i, o) in upstream_cost.items()
    }
    assert a_rates[x] == (Decimal("0.154321"), Decimal("0.25"))  # 0.15432125 rounded
    b_rates = {x: (Decimal("0.35"), Decimal("0.5"))}
    b_rates |= {m: (Decimal(i), Decimal(o)) for m, (i, o) in listed.items() if m != x}
    markup_version = markup["versions"][0]["id"]
    negotiated_version = negotiated["versions"][0]["id"]

    rows_before = {}
    for account, rates, version in ((a, a_rates, markup_version), (b, b_rates, negotiated_version)):
        rows = ledger(billing, account)
        rows_before[account] = rows
        for r in rows:
            model = r["requested_model"]
            assert r["cost_usd"] == cost(r, rates[model])
            assert r["rate_card_version_id"] == version
            assert r["price_version_id"] is not None  # the list version in force, kept
            if model in upstream_cost:
                assert r["provider_cost_usd"] == cost(r, upstream_cost[model])
                assert r["provider_cost_version_id"] is not None
            else:  # unknown, never zero
                assert r["provider_cost_usd"] is None and r["provider_cost_version_id"] is None

    # Invoices (drafts of this month): each model's line bills exactly tokens x own rates.
    period = BillingPeriod.of(datetime.now(UTC))
    for account, rates in ((a, a_rates), (b, b_rates)):
        invoice = billing.generate(account, period)
        rows = rows_before[account]
        by_model = {line["model"]: line for line in invoice["lines"]}
        assert set(by_model) == {r["requested_model"] for r in rows}
        for model, line in by_model.items():
            expected = sum(
                (cost(r, rates[model]) for r in rows if r["requested_model"] == model), Decimal(0)
            )
            assert Decimal(line["amount_exact_usd"]) == expected
            assert Decimal(line["amount_usd"]) == round_cents(expected)
            # The list's rates are not what this account pays: the line does not show them.
            assert line["input_usd_per_mtok"] is None
        assert Decimal(invoice["total_usd"]) == sum(
            (Decimal(line["amount_usd"]) for line in invoice["lines"]), Decimal(0)
        )

    # The margin report's token usage, per account and model, to the last decimal.
    report = billing.admin.get("/billing/reports/margin", params={"period": str(period)})
    assert report.status_code == 200, report.text
    usage = report.json()["usage"]
    seen = 0
    for row in usage["rows"]:
        account = uuid.UUID(row["account_id"])
        if account not in (a, b):
            continue
        seen += 1
        rates = a_rates if account == a else b_rates
        rows = [r for r in rows_before[account] if r["requested_model"] == row["model"]]
        revenue = sum((cost(r, rates[row["model"]]) for r in rows), Decimal(0))
        known = row["model"] in upstream_cost
        provider = (
            sum((cost(r, upstream_cost[row["model"]]) for r in rows), Decimal(0))
            if known
            else Decimal(0)
        )
        assert Decimal(row["revenue_usd"]) == revenue
        assert Decimal(row["provider_cost_usd"]) == provider
        assert Decimal(row["margin_usd"]) == (revenue - provider if known else 0)
        if known:
            pct = ((revenue - provider) * 100 / revenue).quantize(Decimal("0.01"), ROUND_HALF_UP)
            assert Decimal(row["margin_pct"]) == pct
            assert Decimal(row["unknown_provider_cost_share"]) == 0
        else:
            assert row["unknown_provider_cost_requests"] == len(rows) == 2
            assert Decimal(row["unknown_provider_cost_share"]) == 1
    assert seen == 5  # a: x, y; b: x, y, z

    # A new version of the 25 % card dated in the past: no stored row changes.
    newer = post(
        billing,
        f"/billing/rate-cards/{markup['id']}/versions",
        {
            "markup_pct": "50",
            "markup_basis": "provider_cost",
            "effective_from": (LONG_AGO + timedelta(days=30)).isoformat(),
        },
    )
    assert [v["markup_pct"] for v in newer["versions"]] == ["25.0000", "50.0000"]
    for account in (a, b):
        assert ledger(billing, account) == rows_before[account]
    # From now on the new terms price a's requests.
    chat(billing, key_a, x, 1)
    sql = "SELECT count(*) FROM usage_ledger WHERE account_id = $1"
    assert wait_for_rows(billing.db, sql, a, count=6) == 6
    (latest,) = [r for r in ledger(billing, a) if r not in rows_before[a]]
    assert latest["rate_card_version_id"] == newer["versions"][1]["id"]
    half = (rate(upstream_cost[x][0], Decimal(50)), rate(upstream_cost[x][1], Decimal(50)))
    assert latest["cost_usd"] == cost(latest, half)


def test_unpriced_rows_are_priced_by_the_rate_card_then_and_a_finalized_invoice_stays(
    billing: Billing,
) -> None:
    """Rows stored unpriced in a closed month are priced on the draft by the account's rate
    card in force at their time; once finalized, a new rate-card version dated before them
    changes neither the rows nor the invoice."""
    tag = secrets.token_hex(3)
    model = f"mock-late-{tag}"
    past = month(-2)
    card = post(
        billing,
        "/billing/rate-cards",
        {"name": f"ten-{tag}", "markup_pct": "10", "effective_from": LONG_AGO.isoformat()},
    )
    assigned = {"rate_card_id": card["id"], "rate_card_effective_from": LONG_AGO.isoformat()}
    account = uuid.UUID(str(billing.server.new_account(**assigned)["id"]))
    when = past.start + timedelta(days=3)
    billing.insert(Row(account, model, when, prompt=1234, completion=567))
    # The list price arrives afterwards, dated before the row.
    billing.price(model, "1.111111", "2.222222", LONG_AGO)
    draft = billing.generate(account, past)
    ten = (rate(Decimal("1.111111"), Decimal(10)), rate(Decimal("2.222222"), Decimal(10)))
    assert ten == (Decimal("1.222222"), Decimal("2.444444"))
    expected = (1234 * ten[0] + 567 * ten[1]) / MILLION
    assert exact_sum(draft) == expected
    (line,) = draft["lines"]
    assert Decimal(line["input_usd_per_mtok"]) == ten[0]  # the account's own rates, shown
    final = billing.finalize(draft["id"])
    rows = billing.db.fetch("SELECT * FROM usage_ledger WHERE account_id = $1", account)

    post(
        billing,
        f"/billing/rate-cards/{card['id']}/versions",
        {"markup_pct": "90", "effective_from": (past.start - timedelta(days=1)).isoformat()},
    )
    assert billing.get(final["id"]) == final
    assert billing.db.fetch("SELECT * FROM usage_ledger WHERE account_id = $1", account) == rows


def test_bad_rate_card_input_is_a_clear_4xx(billing: Billing) -> None:
    tag = secrets.token_hex(3)
    name = f"bad-{tag}"
    below = billing.admin.post("/billing/rate-cards", json={"name": name, "markup_pct": "-100.5"})
    assert below.status_code == 422 and "markup_pct" in below.text
    card = post(billing, "/billing/rate-cards", {"name": name, "markup_pct": "-100"})
    at = card["versions"][0]["effective_from"]
    again = billing.admin.post(
        f"/billing/rate-cards/{card['id']}/versions", json={"effective_from": at, "markup_pct": "5"}
    )
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "rate_card_version_exists"
    assert billing.admin.post("/billing/rate-cards", json={"name": name}).status_code == 409
    assert billing.admin.get("/billing/rate-cards/987654321").status_code == 404
    missing = billing.admin.post("/billing/rate-cards/987654321/versions", json={})
    assert missing.status_code == 404
    unknown = billing.admin.post("/billing/accounts", json={"name": "x", "rate_card_id": 987654321})
    assert unknown.status_code == 404
    twice = billing.admin.post(
        "/billing/rate-cards",
        json={
            "name": f"twice-{tag}",
            "rates": [
                {"model": "m", "input_usd_per_mtok": "1", "output_usd_per_mtok": "1"},
                {"model": "m", "input_usd_per_mtok": "2", "output_usd_per_mtok": "2"},
            ],
        },
    )
    assert twice.status_code == 422
    bad_basis = billing.admin.post(
        "/billing/rate-cards", json={"name": f"basis-{tag}", "markup_basis": "cost"}
    )
    assert bad_basis.status_code == 422
    # An account's assignments are a history: the same instant twice is refused.
    account = billing.server.new_account()
    when = datetime.now(UTC).isoformat()
    body = {"rate_card_id": card["id"], "rate_card_effective_from": when}
    assert billing.admin.patch(f"/billing/accounts/{account['id']}", json=body).status_code == 200
    assert billing.admin.patch(f"/billing/accounts/{account['id']}", json=body).status_code == 409
    cleared = {"rate_card_id": None}
    patched = billing.admin.patch(f"/billing/accounts/{account['id']}", json=cleared)
    assert patched.status_code == 200 and patched.json()["rate_card_id"] is None
    history = billing.admin.get(f"/billing/accounts/{account['id']}/rate-cards").json()["data"]
    assert [h["rate_card_id"] for h in history] == [card["id"], None]
    cost_body = {"provider": "mock", "model": "m", "input_usd_per_mtok": "-1"}
    cost_body["output_usd_per_mtok"] = "1"
    assert billing.admin.post("/billing/provider-costs", json=cost_body).status_code == 422


def test_an_estimate_quote_takes_its_cost_basis_from_the_provider_cost_where_known(
    billing: Billing,
) -> None:
    tag = secrets.token_hex(3)
    known, unknown = f"mock-q-{tag}", f"mock-r-{tag}"
    for model in (known, unknown):
        billing.price(model, "1", "2", LONG_AGO)
    body = {"provider": "mock", "model": known, "input_usd_per_mtok": "0.25"}
    body |= {"output_usd_per_mtok": "0.5", "effective_from": LONG_AGO.isoformat()}
    post(billing, "/billing/provider-costs", body)
    account = billing.server.new_account()
    quotes = {}
    for model in (known, unknown):
        quotes[model] = post(
            billing,
            "/billing/quotes",
            {
                "account_id": account["id"],
                "task_type": "summarize",
                "model": model,
                "prompt_tokens": 1000,
                "max_completion_tokens": 3000,
            },
        )
    assert quotes[known]["basis"] == quotes[unknown]["basis"] == "estimate"
    assert quotes[known]["cost_source"] == "provider_cost"
    assert Decimal(quotes[known]["expected_cost_usd"]) == Decimal("0.00175")  # 0.25 + 1.5
    assert quotes[unknown]["cost_source"] == "list_price"
    assert Decimal(quotes[unknown]["expected_cost_usd"]) == Decimal("0.007")  # 1 + 6


def test_provider_costs_round_trip_through_the_cli(billing: Billing, tmp_path: Path) -> None:
    tag = secrets.token_hex(3)
    table = tmp_path / "costs.csv"
    table.write_text(
        "model,input_usd_per_mtok,output_usd_per_mtok,cached_input_usd_per_mtok,effective_from\n"
        f"cli-{tag}/*,0.11,0.22,,2026-02-01\n"
        f"cli-{tag}/exact,0.3,0.4,0.05,2026-03-01T12:00:00Z\n"
    )
    provider = f"prov-{tag}"
    env = {"METERLINE_DATABASE_URL": billing.db.url}
    imported = meterline_cli(
        "provider-costs", "import", str(table), "--provider", provider, env=env
    )
    assert "imported 2 new versions" in imported.stderr
    again = meterline_cli("provider-costs", "import", str(table), "--provider", provider, env=env)
    assert "0 new versions, 2 already present" in again.stderr
    exported = meterline_cli(
        "provider-costs",
        "export",
        "--provider",
        provider,
        "--url",
        billing.server.url,
        "--token",
        ADMIN_TOKEN,
        env=env,
    )
    assert exported.stdout == (
        "model,input_usd_per_mtok,output_usd_per_mtok,cached_input_usd_per_mtok,effective_from\n"
        f"cli-{tag}/*,0.11,0.22,,2026-02-01T00:00:00Z\n"
        f"cli-{tag}/exact,0.3,0.4,0.05,2026-03-01T12:00:00Z\n"
    )


def test_the_providers_file_names_a_default_cost_table(billing: Billing, tmp_path: Path) -> None:
    tag = secrets.token_hex(3)
    (tmp_path / "costs").mkdir()
    (tmp_path / "costs" / "up.yaml").write_text(
        f"- {{model: 'file-{tag}/*', input_usd_per_mtok: 0.07, output_usd_per_mtok: 0.09}}\n"
    )
    providers = tmp_path / "providers.yaml"
    providers.write_text(
        "providers:\n"
        f"  - name: up-{tag}\n"
        "    base_url: http://127.0.0.1:9/v1\n"
        f"    models: ['file-{tag}/*']\n"
        "    cost_table: costs/up.yaml\n"
    )
    (provider,) = load_providers(providers)
    assert provider.cost_table == str(tmp_path / "costs" / "up.yaml")

    async def seed_twice() -> None:
        engine = create_engine(billing.db.url, pool_size=1)
        try:
            await seed_provider_costs(session_factory(engine), [provider])
            await seed_provider_costs(session_factory(engine), [provider])  # nothing new
        finally:
            await engine.dispose()

    asyncio.run(seed_twice())
    listed = billing.admin.get("/billing/provider-costs", params={"provider": f"up-{tag}"})
    (version,) = listed.json()["data"]
    assert (version["input_usd_per_mtok"], version["output_usd_per_mtok"]) == (
        "0.070000",
        "0.090000",
    )
    assert version["source"] == "providers_file"
    assert version["effective_from"].startswith("1970-01-01")
    with pytest.raises(ProvidersFileError):
        parse_providers(
            "providers:\n  - {name: x, base_url: http://h/v1, models: [a], cost_table: 3}"
        )
