"""Tenant isolation on the billing API, and a revoked key refused by the proxy at once.

A customer key of account B must find nothing of account A: every endpoint answers 404 for
A's objects exactly as for ids that do not exist, so B cannot even learn what exists.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import Meterline
from tests.support import Database
from tests.usage_rows import insert_usage, usage_row

NOW = datetime.now(UTC)
MONTH = f"{NOW:%Y-%m}"


def _client(meterline: Meterline, secret: str) -> httpx.Client:
    return httpx.Client(
        base_url=meterline.url, headers={"Authorization": f"Bearer {secret}"}, timeout=30
    )


@pytest.fixture(scope="module")
def tenants(meterline: Meterline, db: Database) -> dict[str, Any]:
    """Account A with a key, usage, a quoted task and an invoice; account B with a key."""
    a_id, a_secret = meterline.customer()
    b_id, b_secret = meterline.customer()
    with meterline.admin() as admin:
        a_key = admin.get(f"/billing/accounts/{a_id}/keys").json()["data"][0]["id"]
        b_key = admin.get(f"/billing/accounts/{b_id}/keys").json()["data"][0]["id"]
    insert_usage(
        db,
        usage_row(a_id, NOW - timedelta(minutes=5), key_id=a_key, task_id="a-task", prompt=77),
    )
    quote_id = db.fetchval(
        "INSERT INTO quotes (account_id, task_type, model, basis, sample_size, confidence,"
        " margin, expected_cost_usd, quantile_cost_usd, price_usd, valid_until)"
        " VALUES ($1, 'summarize', 'mock-chat', 'estimate', 0, 0.9, 0.2, 0.001, 0.001, 0.05,"
        " now() + interval '1 hour') RETURNING id",
        a_id,
    )
    db.execute(
        "INSERT INTO tasks (account_id, external_id, task_type, model, status)"
        " VALUES ($1, 'a-task', 'summarize', 'mock-chat', 'open')",
        a_id,
    )
    invoice_id = db.fetchval(
        "INSERT INTO invoices (account_id, period, status) VALUES ($1, '2025-01', 'draft')"
        " RETURNING id",
        a_id,
    )
    return {
        "a": str(a_id),
        "a_key": a_key,
        "a_secret": a_secret,
        "b": str(b_id),
        "b_key": b_key,
        "b_secret": b_secret,
        "quote": str(quote_id),
        "invoice": str(invoice_id),
    }


def _cases(t: dict[str, Any], a: str, key: str, quote: str, invoice: str) -> list[Any]:
    """(route template, method, path, params, json) for everything of account `a`."""
    return [
        ("/billing/accounts", "GET", "/billing/accounts", {}, None),
        ("/billing/accounts", "POST", "/billing/accounts", {}, {"name": "x"}),
        ("/billing/accounts/{account_id}", "GET", f"/billing/accounts/{a}", {}, None),
        ("/billing/accounts/{account_id}", "PATCH", f"/billing/accounts/{a}", {}, {"name": "x"}),
        ("/billing/accounts/{account_id}/keys", "GET", f"/billing/accounts/{a}/keys", {}, None),
        ("/billing/accounts/{account_id}/keys", "POST", f"/billing/accounts/{a}/keys", {}, {}),
        ("/billing/keys/{key_id}", "DELETE", f"/billing/keys/{key}", {}, None),
        ("/billing/usage", "GET", "/billing/usage", {"account_id": a}, None),
        ("/billing/usage", "GET", "/billing/usage", {"key_id": key}, None),
        ("/billing/usage/events", "GET", "/billing/usage/events", {"account_id": a}, None),
        ("/billing/usage/events", "GET", "/billing/usage/events", {"key_id": key}, None),
        (
            "/billing/reports/monthly",
            "GET",
            "/billing/reports/monthly",
            {"period": MONTH, "account_id": a},
            None,
        ),
        ("/billing/quotes/{quote_id}", "GET", f"/billing/quotes/{quote}", {}, None),
        (
            "/billing/quotes/{quote_id}/accept",
            "POST",
            f"/billing/quotes/{quote}/accept",
            {},
            None,
        ),
        (
            "/billing/quotes",
            "POST",
            "/billing/quotes",
            {},
            {"account_id": a, "task_type": "summarize", "model": "mock-chat", "prompt_tokens": 9},
        ),
        ("/billing/tasks", "GET", "/billing/tasks", {"account_id": a}, None),
        ("/billing/tasks/{task_id}", "GET", "/billing/tasks/a-task", {"account_id": a}, None),
        (
            "/billing/tasks/{task_id}/complete",
            "POST",
            "/billing/tasks/a-task/complete",
            {"account_id": a},
            {"outcome": "succeeded"},
        ),
        ("/billing/invoices", "GET", "/billing/invoices", {"account_id": a}, None),
        (
            "/billing/invoices",
            "POST",
            "/billing/invoices",
            {},
            {"account_id": a, "period": "2025-01"},
        ),
        ("/billing/invoices/{invoice_id}", "GET", f"/billing/invoices/{invoice}", {}, None),
        (
            "/billing/invoices/{invoice_id}/finalize",
            "POST",
            f"/billing/invoices/{invoice}/finalize",
            {},
            None,
        ),
        (
            "/billing/invoices/{invoice_id}/void",
            "POST",
            f"/billing/invoices/{invoice}/void",
            {},
            {"reason": "x"},
        ),
        ("/billing/reports/margin", "GET", "/billing/reports/margin", {"period": MONTH}, None),
        ("/billing/keys/{key_id}", "PATCH", f"/billing/keys/{key}", {}, {"rate_limit_rpm": 9}),
        (
            "/billing/accounts/{account_id}/adjustments",
            "POST",
            f"/billing/accounts/{a}/adjustments",
            {},
            {"amount_usd": "-5", "reason": "x"},
        ),
        (
            "/billing/invoices/{invoice_id}/credit-notes",
            "POST",
            f"/billing/invoices/{invoice}/credit-notes",
            {},
            {"amount_usd": "5", "reason": "x"},
        ),
    ]


def _routes(meterline: Meterline) -> set[tuple[str, str]]:
    schema = httpx.get(f"{meterline.url}/openapi.json").json()
    return {
        (path.replace("{task_id:path}", "{task_id}"), method.upper())
        for path, item in schema["paths"].items()
        for method in item
    }


MINE = {
    "/billing/accounts/{account_id}/adjustments",
    "/billing/invoices/{invoice_id}/credit-notes",
    "/billing/accounts",
    "/billing/accounts/{account_id}",
    "/billing/accounts/{account_id}/keys",
    "/billing/keys/{key_id}",
    "/billing/usage",
    "/billing/usage/events",
    "/billing/reports/monthly",
}


def test_a_key_of_b_finds_nothing_of_a(meterline: Meterline, tenants: dict[str, Any]) -> None:
    t = tenants
    routes = _routes(meterline)
    cases = _cases(t, t["a"], t["a_key"], t["quote"], t["invoice"])
    # Ids that exist nowhere: the answers must be the same as for A's real objects.
    guessed = _cases(t, str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4()))
    checked, problems = [], []
    with _client(meterline, t["b_secret"]) as b:
        for (route, method, path, params, body), (_, _, g_path, g_params, g_body) in zip(
            cases, guessed, strict=True
        ):
            if (route, method) not in routes:
                assert route not in MINE, f"{method} {route} missing from the API"
                continue
            checked.append((method, route))
            real = b.request(method, path, params=params, json=body)
            fake = b.request(method, g_path, params=g_params, json=g_body)
            if real.status_code != 404 or fake.status_code != 404:
                problems.append(f"{method} {route}: {real.status_code}/{fake.status_code}")
                continue
            # Same answer for A's object as for nothing at all: no existence leak.
            same = ("type", "code", "param")
            answers = [[r.json()["error"][f] for f in same] for r in (real, fake)]
            if answers[0] != answers[1]:
                problems.append(f"{method} {route}: {answers[0]} != {answers[1]}")
    assert not problems, "\n".join(problems)
    assert {r for _, r in checked} >= MINE


def test_a_key_of_b_sees_only_b_without_filters(
    meterline: Meterline, tenants: dict[str, Any]
) -> None:
    t = tenants
    window = {"start": (NOW - timedelta(hours=1)).isoformat(), "end": NOW.isoformat()}
    with meterline.admin() as admin:
        # A's row is there for the admin...
        [a_total] = admin.get("/billing/usage", params={"account_id": t["a"], **window}).json()[
            "data"
        ]
        assert a_total["prompt_tokens"] == 77
    with _client(meterline, t["b_secret"]) as b:
        # ...and not for B, whatever B leaves out.
        [b_total] = b.get("/billing/usage", params=window).json()["data"]
        assert b_total["requests"] == 0
        grouped = b.get("/billing/usage", params={"group_by": "key,task", **window}).json()
        assert grouped["data"] == []
        assert b.get("/billing/usage/events").json()["data"] == []
        report = b.get("/billing/reports/monthly", params={"period": MONTH, "format": "json"})
        assert report.json()["data"] == []
        assert t["a"] not in report.text


def test_a_customer_reads_its_own_account_but_cannot_change_keys(
    meterline: Meterline, tenants: dict[str, Any]
) -> None:
    t = tenants
    with _client(meterline, t["b_secret"]) as b:
        own = b.get(f"/billing/accounts/{t['b']}")
        assert own.status_code == 200 and own.json()["id"] == t["b"]
        keys = b.get(f"/billing/accounts/{t['b']}/keys")
        assert keys.status_code == 200
        assert [k["id"] for k in keys.json()["data"]] == [t["b_key"]]
        for method, path, body in (
            ("PATCH", f"/billing/accounts/{t['b']}", {"tier": "pro"}),
            ("POST", f"/billing/accounts/{t['b']}/keys", {}),
            ("DELETE", f"/billing/keys/{t['b_key']}", None),
        ):
            response = b.request(method, path, json=body)
            assert response.status_code == 403, (method, path)
            assert response.json()["error"]["type"] == "permission_error"
    with meterline.admin() as admin:
        account = admin.get(f"/billing/accounts/{t['b']}").json()
        assert account["tier"] == "basic"
        assert len(admin.get(f"/billing/accounts/{t['b']}/keys").json()["data"]) == 1


def _ask(client: openai.OpenAI) -> str | None:
    reply = client.chat.completions.create(
        model="mock-chat", messages=[{"role": "user", "content": "Hello"}], max_tokens=5
    )
    return reply.choices[0].message.content


def test_a_revoked_key_is_refused_by_the_proxy_at_once(meterline: Meterline) -> None:
    account_id, secret = meterline.customer()
    with meterline.admin() as admin:
        key_id = admin.get(f"/billing/accounts/{account_id}/keys").json()["data"][0]["id"]
    client = openai.OpenAI(base_url=meterline.v1, api_key=secret, max_retries=0)
    assert _ask(client)
    with meterline.admin() as admin:
        assert admin.delete(f"/billing/keys/{key_id}").status_code == 200
    # No waiting for a cache refresh: the very next request is refused.
    with pytest.raises(openai.AuthenticationError):
        _ask(client)


def test_an_expired_key_is_refused_by_the_proxy(meterline: Meterline) -> None:
    account_id = meterline.new_account()["id"]
    expires = datetime.now(UTC) + timedelta(seconds=1.5)
    secret = meterline.new_key(account_id, expires_at=expires.isoformat())
    client = openai.OpenAI(base_url=meterline.v1, api_key=secret, max_retries=0)
    assert _ask(client)
    time.sleep(max(0.0, (expires - datetime.now(UTC)).total_seconds()) + 0.1)
    with pytest.raises(openai.AuthenticationError):
        _ask(client)
