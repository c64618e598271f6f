"""Usage totals and raw rows through the billing API, against hand-computed figures."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest

from tests.conftest import Meterline
from tests.support import Database
from tests.usage_rows import insert_usage, usage_row

MARCH = {"start": "2025-03-01T00:00:00Z", "end": "2025-04-01T00:00:00Z"}


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.fixture(scope="module")
def march(meterline: Meterline, db: Database) -> dict[str, Any]:
    """An account with two keys and a known March 2025, plus noise around it."""
    account_id = str(meterline.new_account(name="usage-march")["id"])
    k1 = meterline.new_key(account_id, name="k1")
    k2 = meterline.new_key(account_id, name="k2")
    with meterline.admin() as admin:
        ids = {
            k["name"]: k["id"]
            for k in admin.get(f"/billing/accounts/{account_id}/keys").json()["data"]
        }
    other = str(meterline.new_account(name="usage-other")["id"])
    row = usage_row
    insert_usage(
        db,
        # The first instant of the range is in it.
        row(
            account_id,
            at("2025-03-01T00:00:00"),
            key_id=ids["k1"],
            model="m-a",
            provider="p1",
            prompt=100,
            completion=50,
            cost="0.000150000000",
            task_id="t1",
            task_type="summarize",
            cached=40,
        ),
        row(
            account_id,
            at("2025-03-01T12:00:00"),
            key_id=ids["k1"],
            model="m-a",
            provider="p1",
            prompt=10,
            completion=5,
            cost="0.000015",
            task_id="t1",
            task_type="summarize",
            reasoning=2,
        ),
        row(
            account_id,
            at("2025-03-02T08:00:00"),
            key_id=ids["k2"],
            model="m-b",
            provider="p2",
            prompt=1000,
            completion=0,
            cost="0.002",
        ),
        row(
            account_id,
            at("2025-03-02T09:00:00"),
            key_id=ids["k2"],
            model="m-b",
            provider="p2",
            prompt=20,
            completion=0,
            cost="0.00004",
            status=500,
        ),
        # Unpriced: counted, but adds no cost.
        row(
            account_id,
            at("2025-03-31T23:59:59.999999"),
            key_id=ids["k1"],
            model="m-a",
            provider="p1",
            prompt=7,
            completion=3,
            cost=None,
        ),
        # Just outside the range on either side, and another account inside it.
        row(account_id, at("2025-04-01T00:00:00"), key_id=ids["k1"], model="m-a", prompt=999),
        row(account_id, at("2025-02-28T23:59:59.999999"), key_id=ids["k1"], prompt=999),
        row(other, at("2025-03-15T00:00:00"), model="m-a", prompt=5000, cost="1"),
    )
    return {"account_id": account_id, "keys": ids, "secrets": (k1, k2), "other": other}


def _usage(meterline: Meterline, **params: Any) -> httpx.Response:
    with meterline.admin() as admin:
        return admin.get("/billing/usage", params=params)


def _data(meterline: Meterline, **params: Any) -> list[dict[str, Any]]:
    response = _usage(meterline, **params)
    assert response.status_code == 200, response.text
    data: list[dict[str, Any]] = response.json()["data"]
    return data


def _figures(row: dict[str, Any]) -> tuple[int, int, int, int, Decimal]:
    return (
        row["requests"],
        row["prompt_tokens"],
        row["completion_tokens"],
        row["total_tokens"],
        Decimal(row["cost_usd"]),
    )


def test_totals_without_groups(meterline: Meterline, march: dict[str, Any]) -> None:
    [total] = _data(meterline, account_id=march["account_id"], **MARCH)
    assert _figures(total) == (5, 1137, 58, 1195, Decimal("0.002205"))
    assert total["cached_tokens"] == 40
    assert total["reasoning_tokens"] == 2
    assert total["unpriced_requests"] == 1
    # Exact decimal strings at the ledger's scale.
    assert total["cost_usd"] == "0.002205000000"
    assert set(total) == {
        "requests",
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "cached_tokens",
        "reasoning_tokens",
        "cost_usd",
        "unpriced_requests",
    }


def test_group_by_day_and_model(meterline: Meterline, march: dict[str, Any]) -> None:
    data = _data(meterline, account_id=march["account_id"], group_by="day,model", **MARCH)
    assert [(r["day"], r["model"], *_figures(r)) for r in data] == [
        ("2025-03-01", "m-a", 2, 110, 55, 165, Decimal("0.000165")),
        ("2025-03-02", "m-b", 2, 1020, 0, 1020, Decimal("0.00204")),
        ("2025-03-31", "m-a", 1, 7, 3, 10, Decimal("0")),
    ]
    # Only the requested group fields appear.
    assert "key_id" not in data[0] and "month" not in data[0]
    assert data[2]["unpriced_requests"] == 1


def test_group_by_every_other_dimension(meterline: Meterline, march: dict[str, Any]) -> None:
    account, keys = march["account_id"], march["keys"]
    by = {
        g: _data(meterline, account_id=account, group_by=g, **MARCH)
        for g in ("month", "key", "task", "task_type", "provider", "status")
    }
    assert [(r["month"], r["requests"]) for r in by["month"]] == [("2025-03", 5)]
    assert {r["key_id"]: _figures(r) for r in by["key"]} == {
        keys["k1"]: (3, 117, 58, 175, Decimal("0.000165")),
        keys["k2"]: (2, 1020, 0, 1020, Decimal("0.00204")),
    }
    assert {r["task_id"]: r["requests"] for r in by["task"]} == {"t1": 2, None: 3}
    assert {r["task_type"]: r["requests"] for r in by["task_type"]} == {"summarize": 2, None: 3}
    assert {r["provider"]: r["total_tokens"] for r in by["provider"]} == {"p1": 175, "p2": 1020}
    assert {r["status_code"]: r["requests"] for r in by["status"]} == {200: 4, 500: 1}


def test_filters(meterline: Meterline, march: dict[str, Any]) -> None:
    account, keys = march["account_id"], march["keys"]
    [k2] = _data(meterline, account_id=account, key_id=keys["k2"], **MARCH)
    assert _figures(k2) == (2, 1020, 0, 1020, Decimal("0.00204"))
    # A key filter alone finds the key's account.
    [k2_alone] = _data(meterline, key_id=keys["k2"], **MARCH)
    assert k2_alone == k2
    [t1] = _data(meterline, account_id=account, task_id="t1", **MARCH)
    assert _figures(t1) == (2, 110, 55, 165, Decimal("0.000165"))
    [m_b] = _data(meterline, account_id=account, model="m-b", **MARCH)
    assert m_b["requests"] == 2
    # Half-open range: the first day only.
    [day] = _data(meterline, account_id=account, start="2025-03-01", end="2025-03-02")
    assert day["requests"] == 2
    # An offset in the bounds is honoured: 2025-03-02T08:00Z is 09:00+01:00.
    [hour] = _data(
        meterline,
        account_id=account,
        start="2025-03-02T09:00:00+01:00",
        end="2025-03-02T09:00:01+01:00",
    )
    assert hour["requests"] == 1
    # The admin without an account filter sees every account.
    [everyone] = _data(meterline, model="m-a", start="2025-03-15", end="2025-03-16")
    assert everyone["requests"] >= 1 and everyone["prompt_tokens"] >= 5000


def test_a_customer_key_sees_its_own_usage_only(
    meterline: Meterline, march: dict[str, Any]
) -> None:
    secret = march["secrets"][0]
    with httpx.Client(base_url=meterline.url, headers={"Authorization": f"Bearer {secret}"}) as c:
        [own] = c.get("/billing/usage", params=MARCH).json()["data"]
        assert own["requests"] == 5
        assert (
            c.get("/billing/usage", params={"account_id": march["other"], **MARCH}).status_code
            == 404
        )


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"group_by": "day,colour"}, "query.group_by"),
        ({"start": "yesterday"}, "query.start"),
        ({"start": "0001-01-01T00:00:00+01:00"}, "query.start"),
        ({"start": "2025-03-02", "end": "2025-03-01"}, "query.end"),
        ({"account_id": "nope"}, "query.account_id"),
        ({"limit": 0}, "query.limit"),
    ],
)
def test_bad_parameters_are_422_naming_them(
    meterline: Meterline, params: dict[str, Any], param: str
) -> None:
    response = _usage(meterline, **params)
    assert response.status_code == 422
    body = response.json()["error"]
    assert body["param"] == param
    if param == "query.group_by":
        assert "colour" in body["message"]


def test_group_limit_reports_more(meterline: Meterline, march: dict[str, Any]) -> None:
    response = _usage(meterline, account_id=march["account_id"], group_by="day", limit=2, **MARCH)
    body = response.json()
    assert len(body["data"]) == 2
    assert body["has_more"] is True


def test_unknown_key_filter_is_404(meterline: Meterline) -> None:
    response = _usage(meterline, key_id=str(uuid.uuid4()))
    assert response.status_code == 404


def _events(meterline: Meterline, **params: Any) -> dict[str, Any]:
    with meterline.admin() as admin:
        response = admin.get("/billing/usage/events", params=params)
    assert response.status_code == 200, response.text
    page: dict[str, Any] = response.json()
    return page


def test_event_pages_are_stable_under_concurrent_inserts(
    meterline: Meterline, db: Database
) -> None:
    account = str(meterline.new_account(name="events")["id"])
    base = at("2025-06-10T00:00:00")
    rows = [usage_row(account, base + timedelta(minutes=m)) for m in (0, 1, 3, 4)]
    # Two rows of the same instant: the request id orders them.
    rows += [
        usage_row(account, base + timedelta(minutes=2), request_id=f"req_tie_{account[:8]}_{s}")
        for s in ("a", "b")
    ]
    insert_usage(db, *rows)
    expected = sorted((r["occurred_at"], r["request_id"]) for r in rows)

    first = _events(meterline, account_id=account, limit=2)
    assert first["has_more"] is True
    # Recorded while the client pages: one behind the cursor (late), one ahead of it.
    behind = usage_row(account, base + timedelta(seconds=30))
    ahead = usage_row(account, base + timedelta(minutes=9))
    insert_usage(db, behind, ahead)
    seen = first["data"]
    cursor = first["next_cursor"]
    while cursor:
        page = _events(meterline, account_id=account, limit=2, cursor=cursor)
        seen += page["data"]
        cursor = page["next_cursor"]
        assert (cursor is None) == (not page["has_more"])

    keys = [(datetime.fromisoformat(e["occurred_at"]), e["request_id"]) for e in seen]
    assert len(keys) == len(set(keys)), "a row was returned twice"
    assert keys == sorted(keys)
    assert keys == [*expected, (ahead["occurred_at"], ahead["request_id"])]
    # The row inserted behind the cursor is there for the next reader from the start.
    fresh = _events(meterline, account_id=account, limit=100)["data"]
    assert behind["request_id"] in {e["request_id"] for e in fresh}


def test_event_rows_carry_the_ledger_fields(meterline: Meterline, db: Database) -> None:
    account = str(meterline.new_account(name="event-fields")["id"])
    row = usage_row(
        account,
        at("2025-06-11T10:00:00.123456"),
        model="m-x",
        task_id="job-7",
        task_type="extract",
        cost="0.000000012345",
        cached=3,
    )
    insert_usage(db, row, usage_row(account, at("2025-06-11T11:00:00"), cost=None))
    data = _events(meterline, account_id=account, task_id="job-7")["data"]
    assert len(data) == 1
    event = data[0]
    assert event["request_id"] == row["request_id"]
    assert event["occurred_at"] == "2025-06-11T10:00:00.123456Z"
    assert event["model"] == "m-x"
    assert event["cost_usd"] == "0.000000012345"
    assert (event["prompt_tokens"], event["completion_tokens"], event["total_tokens"]) == (
        10,
        5,
        15,
    )
    assert (event["task_id"], event["task_type"], event["cached_tokens"]) == ("job-7", "extract", 3)
    unpriced = _events(meterline, account_id=account, start="2025-06-11T10:30:00Z")["data"]
    assert [e["cost_usd"] for e in unpriced] == [None]


@pytest.mark.parametrize("limit", [0, 1001])
def test_event_limit_is_bounded(meterline: Meterline, limit: int) -> None:
    with meterline.admin() as admin:
        response = admin.get("/billing/usage/events", params={"limit": limit})
    assert response.status_code == 422
    assert response.json()["error"]["param"] == "query.limit"
