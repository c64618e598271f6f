"""Accounts and keys through the billing API, on the shared server and database."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner, Result

from service.cli import app as cli_app
from tests.conftest import ADMIN_TOKEN, Meterline
from tests.support import Database
from tests.usage_rows import insert_usage, usage_row


def _walk(client: httpx.Client, path: str, limit: int) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    params: dict[str, Any] = {"limit": limit}
    while True:
        page = client.get(path, params=params).raise_for_status().json()
        assert len(page["data"]) <= limit
        items += page["data"]
        if not page["has_more"]:
            assert page["next_cursor"] is None
            return items
        params["cursor"] = page["next_cursor"]


def test_create_and_read_an_account_with_every_field(meterline: Meterline) -> None:
    body = {
        "name": "Globex",
        "tier": "custom",
        "monthly_budget_usd": "250.50",
        "low_balance_threshold_usd": "5.25",
        "quote_margin": "0.35",
        "failed_task_policy": "cost",
        "customer_reported_outcomes": True,
        "rate_limit_rpm": 600,
        "rate_limit_tpm": 100000,
    }
    with meterline.admin() as client:
        created = client.post("/billing/accounts", json=body)
        assert created.status_code == 201
        account = created.json()
        fetched = client.get(f"/billing/accounts/{account['id']}").json()
    assert fetched == account
    assert account["name"] == "Globex"
    assert account["tier"] == "custom"
    # Money and margins come back as exact decimal strings, never numbers.
    assert isinstance(account["monthly_budget_usd"], str)
    assert Decimal(account["monthly_budget_usd"]) == Decimal("250.50")
    assert Decimal(account["low_balance_threshold_usd"]) == Decimal("5.25")
    assert Decimal(account["quote_margin"]) == Decimal("0.35")
    assert account["failed_task_policy"] == "cost"
    assert account["customer_reported_outcomes"] is True
    assert (account["rate_limit_rpm"], account["rate_limit_tpm"]) == (600, 100000)
    assert account["created_at"].endswith("Z")


def test_defaults_and_a_zero_budget_stay_plain_decimals(meterline: Meterline) -> None:
    account = meterline.new_account(monthly_budget_usd="0")
    assert account["tier"] == "basic"
    assert account["failed_task_policy"] == "free"
    assert account["customer_reported_outcomes"] is False  # outcomes are the operator's
    assert account["quote_margin"] is None
    assert account["low_balance_threshold_usd"] is None  # no credits.low
    # A NUMERIC zero must not leak out as "0E-12".
    assert account["monthly_budget_usd"] == "0.000000000000"


def test_patch_changes_only_the_fields_sent_and_null_clears(meterline: Meterline) -> None:
    account = meterline.new_account(
        name="Initech", monthly_budget_usd="10", rate_limit_rpm=5, low_balance_threshold_usd="2"
    )
    with meterline.admin() as client:
        response = client.patch(
            f"/billing/accounts/{account['id']}",
            json={
                "tier": "pro",
                "monthly_budget_usd": None,
                "low_balance_threshold_usd": None,
                "quote_margin": "0.1",
            },
        )
        assert response.status_code == 200
        patched = response.json()
        assert patched["tier"] == "pro"
        assert patched["monthly_budget_usd"] is None
        assert patched["low_balance_threshold_usd"] is None
        assert Decimal(patched["quote_margin"]) == Decimal("0.1")
        assert patched["name"] == "Initech"
        assert patched["rate_limit_rpm"] == 5
        assert patched["updated_at"] >= account["updated_at"]
        # Persisted, not just echoed.
        assert client.get(f"/billing/accounts/{account['id']}").json() == patched


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"name": None}, "body.name"),
        ({"tier": "gold"}, "body.tier"),
        ({"failed_task_policy": None}, "body.failed_task_policy"),
        ({"customer_reported_outcomes": None}, "body.customer_reported_outcomes"),
        ({"customer_reported_outcomes": "sometimes"}, "body.customer_reported_outcomes"),
        ({"monthly_budget_usd": "-1"}, "body.monthly_budget_usd"),
        # A balance never falls below 0: a threshold must be more.
        ({"low_balance_threshold_usd": "0"}, "body.low_balance_threshold_usd"),
        ({"low_balance_threshold_usd": "-0.01"}, "body.low_balance_threshold_usd"),
        ({"low_balance_threshold_usd": "0.0000000000001"}, "body.low_balance_threshold_usd"),
        ({"quote_margin": "abc"}, "body.quote_margin"),
        ({"rate_limit_rpm": 0}, "body.rate_limit_rpm"),
        ({"colour": "red"}, "body.colour"),
    ],
)
def test_patch_validation_names_the_field(
    meterline: Meterline, body: dict[str, Any], param: str
) -> None:
    account = meterline.new_account()
    with meterline.admin() as client:
        response = client.patch(f"/billing/accounts/{account['id']}", json=body)
    assert response.status_code == 422
    assert response.json()["error"]["param"] == param


def test_unknown_account_is_404_and_bad_id_is_422(meterline: Meterline) -> None:
    with meterline.admin() as client:
        missing = client.get(f"/billing/accounts/{uuid.uuid4()}")
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "not_found"
        assert client.patch(f"/billing/accounts/{uuid.uuid4()}", json={}).status_code == 404
        bad = client.get("/billing/accounts/not-a-uuid")
        assert bad.status_code == 422
        assert bad.json()["error"]["param"] == "path.account_id"


def test_account_list_pages_are_stable_while_accounts_are_created(meterline: Meterline) -> None:
    mine = [meterline.new_account(name=f"page-{i}")["id"] for i in range(3)]
    with meterline.admin() as client:
        first = client.get("/billing/accounts", params={"limit": 2}).json()
        assert len(first["data"]) == 2
        assert first["has_more"] is True
        # Created between two pages: it sorts last, so it shows up once, at the end.
        late = meterline.new_account(name="late")["id"]
        rest = []
        params: dict[str, Any] = {"limit": 2, "cursor": first["next_cursor"]}
        while True:
            page = client.get("/billing/accounts", params=params).json()
            rest += page["data"]
            if not page["has_more"]:
                break
            params["cursor"] = page["next_cursor"]
        ids = [a["id"] for a in first["data"] + rest]
        assert len(ids) == len(set(ids))
        assert ids[-1] == late
        positions = [ids.index(i) for i in mine]
        assert positions == sorted(positions)
        # Same set as a single big page.
        everything = _walk(client, "/billing/accounts", limit=200)
        assert {a["id"] for a in everything} >= set(ids)


@pytest.mark.parametrize("limit", [0, 201])
def test_list_limit_is_bounded(meterline: Meterline, limit: int) -> None:
    with meterline.admin() as client:
        response = client.get("/billing/accounts", params={"limit": limit})
    assert response.status_code == 422
    assert response.json()["error"]["param"] == "query.limit"


def test_a_forged_cursor_is_422_not_500(meterline: Meterline) -> None:
    with meterline.admin() as client:
        for cursor in ("garbage", "WyJ4Il0", "eyJhIjoxfQ"):
            response = client.get("/billing/accounts", params={"cursor": cursor})
            assert response.status_code == 422
            assert response.json()["error"]["param"] == "query.cursor"


def test_a_key_is_shown_once_and_listed_without_its_secret(meterline: Meterline) -> None:
    account_id, _ = meterline.customer()
    with meterline.admin() as client:
        created = client.post(f"/billing/accounts/{account_id}/keys", json={"name": "ci"})
        assert created.status_code == 201
        key = created.json()
        assert key["key"].startswith("ml-") and len(key["key"]) >= 35
        assert key["key"].startswith(key["prefix"])
        assert key["status"] == "active"
        listed = client.get(f"/billing/accounts/{account_id}/keys").json()["data"]
    assert len(listed) == 2
    entry = next(k for k in listed if k["id"] == key["id"])
    assert "key" not in entry
    assert key["key"] not in str(listed)
    assert entry["name"] == "ci"
    assert entry["prefix"] == key["prefix"]
    assert set(entry) >= {"created_at", "last_used_at", "revoked_at", "expires_at", "status"}


def test_key_list_pages_with_a_key_created_in_between(meterline: Meterline) -> None:
    account_id = meterline.new_account()["id"]
    names = [f"k{i}" for i in range(5)]
    for name in names:
        meterline.new_key(account_id, name=name)
    path = f"/billing/accounts/{account_id}/keys"
    with meterline.admin() as client:
        first = client.get(path, params={"limit": 2}).json()
        meterline.new_key(account_id, name="k5")
        second = client.get(path, params={"limit": 2, "cursor": first["next_cursor"]}).json()
        third = client.get(path, params={"limit": 2, "cursor": second["next_cursor"]}).json()
    assert [k["name"] for k in first["data"] + second["data"] + third["data"]] == [
        *names,
        "k5",
    ]
    assert third["has_more"] is False


def test_revoking_is_idempotent_and_the_key_stops_working(meterline: Meterline) -> None:
    account_id, secret = meterline.customer()
    with meterline.admin() as admin:
        key_id = admin.get(f"/billing/accounts/{account_id}/keys").json()["data"][0]["id"]
    own = httpx.Client(base_url=meterline.url, headers={"Authorization": f"Bearer {secret}"})
    with own, meterline.admin() as admin:
        assert own.get(f"/billing/accounts/{account_id}").status_code == 200
        first = admin.delete(f"/billing/keys/{key_id}")
        assert first.status_code == 200
        assert first.json()["status"] == "revoked"
        second = admin.delete(f"/billing/keys/{key_id}")
        assert second.status_code == 200
        # The first revocation time stands.
        assert second.json()["revoked_at"] == first.json()["revoked_at"]
        refused = own.get(f"/billing/accounts/{account_id}")
        assert refused.status_code == 401
        listed = admin.get(f"/billing/accounts/{account_id}/keys").json()["data"]
        assert listed[0]["status"] == "revoked"
        assert admin.delete(f"/billing/keys/{uuid.uuid4()}").status_code == 404


def test_key_expiry(meterline: Meterline) -> None:
    account_id = meterline.new_account()["id"]
    with meterline.admin() as admin:
        past = admin.post(
            f"/billing/accounts/{account_id}/keys",
            json={"expires_at": "2020-01-01T00:00:00Z"},
        )
        assert past.status_code == 422
        assert past.json()["error"]["param"] == "body.expires_at"
        ancient = admin.post(
            f"/billing/accounts/{account_id}/keys",
            json={"expires_at": "0001-01-01T00:00:00+01:00"},
        )
        assert ancient.status_code == 422
        soon = datetime.now(UTC) + timedelta(seconds=1.5)
        created = admin.post(
            f"/billing/accounts/{account_id}/keys", json={"expires_at": soon.isoformat()}
        ).json()
    assert datetime.fromisoformat(created["expires_at"]) == soon
    url = f"{meterline.url}/billing/accounts/{account_id}"
    headers = {"Authorization": f"Bearer {created['key']}"}
    assert httpx.get(url, headers=headers).status_code == 200
    time.sleep(max(0.0, (soon - datetime.now(UTC)).total_seconds()) + 0.1)
    assert httpx.get(url, headers=headers).status_code == 401
    with meterline.admin() as admin:
        listed = admin.get(f"/billing/accounts/{account_id}/keys").json()["data"]
    assert listed[0]["status"] == "expired"


def _keys_by_name(meterline: Meterline, account_id: str) -> dict[str, dict[str, Any]]:
    with meterline.admin() as admin:
        page = admin.get(f"/billing/accounts/{account_id}/keys").raise_for_status().json()
    return {k["name"]: k for k in page["data"]}


def test_last_used_comes_from_the_ledger(meterline: Meterline, db: Database) -> None:
    account_id = str(meterline.new_account()["id"])
    meterline.new_key(account_id, name="used")
    meterline.new_key(account_id, name="idle")
    keys = _keys_by_name(meterline, account_id)
    used = keys["used"]
    created = datetime.fromisoformat(used["created_at"])
    latest = created + timedelta(seconds=2)
    insert_usage(
        db,
        usage_row(account_id, created + timedelta(seconds=1), key_id=used["id"]),
        usage_row(account_id, latest, key_id=used["id"]),
        # Another key's later row is not this key's use.
        usage_row(account_id, latest + timedelta(seconds=5), key_id=uuid.uuid4()),
    )
    keys = _keys_by_name(meterline, account_id)
    assert datetime.fromisoformat(keys["used"]["last_used_at"]) == latest
    assert keys["idle"]["last_used_at"] is None


def _cli(meterline: Meterline, *args: str) -> Result:
    """The `meterline` command line, run in this process against the real server."""
    runner = CliRunner()
    return runner.invoke(
        cli_app, [*args, "--url", meterline.url, "--token", ADMIN_TOKEN], env={"COLUMNS": "200"}
    )


def test_cli_accounts_and_keys(meterline: Meterline, db: Database) -> None:
    created = _cli(
        meterline, "accounts", "create", "CLI Co", "--tier", "pro", "--budget", "5", "--json"
    )
    assert created.exit_code == 0, created.output
    account = json.loads(created.stdout)
    assert (account["name"], account["tier"]) == ("CLI Co", "pro")
    assert Decimal(account["monthly_budget_usd"]) == 5

    listed = _cli(meterline, "accounts", "list", "--json")
    assert account["id"] in {a["id"] for a in json.loads(listed.stdout)}
    shown = _cli(meterline, "accounts", "show", account["id"])
    assert shown.exit_code == 0 and "CLI Co" in shown.stdout
    for flag, allowed in (
        ("--customer-reported-outcomes", True),
        ("--operator-reported-outcomes", False),
    ):
        updated = _cli(meterline, "accounts", "update", account["id"], flag, "--json")
        assert updated.exit_code == 0, updated.output
        assert json.loads(updated.stdout)["customer_reported_outcomes"] is allowed

    key = json.loads(
        _cli(meterline, "keys", "create", account["id"], "--name", "cli", "--json").stdout
    )
    assert key["key"].startswith("ml-")
    keys = json.loads(_cli(meterline, "keys", "list", account["id"], "--json").stdout)
    assert [(k["id"], k["name"], k["status"]) for k in keys] == [(key["id"], "cli", "active")]

    insert_usage(
        db,
        usage_row(
            account["id"],
            datetime(2025, 7, 1, tzinfo=UTC),
            model="m-cli",
            prompt=12,
            completion=3,
            cost="0.5",
        ),
    )
    usage = _cli(
        meterline,
        "usage",
        "--account-id",
        account["id"],
        "--group-by",
        "model",
        "--start",
        "2025-07-01",
        "--end",
        "2025-08-01",
        "--json",
    )
    [row] = json.loads(usage.stdout)["data"]
    assert (row["model"], row["total_tokens"], row["cost_usd"]) == ("m-cli", 15, "0.500000000000")

    revoked = json.loads(_cli(meterline, "keys", "revoke", key["id"], "--json").stdout)
    assert revoked["status"] == "revoked"

    missing = _cli(meterline, "accounts", "show", str(uuid.uuid4()))
    assert missing.exit_code == 1
    assert "not found" in missing.stderr
