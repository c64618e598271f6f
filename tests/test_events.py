"""CloudEvents ingestion (`POST /billing/events`): usage that did not pass through the proxy,
priced like proxied rows, stored once per (source, id) however often it is sent."""

from __future__ import annotations

import time
import uuid
from decimal import Decimal
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import Meterline
from tests.support import Database
from tests.test_proxy import PRICED

PRICE = Decimal("0.40") / 1_000_000  # PRICED's rate in and out (the default prices)
BATCH = "application/cloudevents-batch+json"


def _event(account_id: uuid.UUID, n: int, **data: Any) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": f"{account_id}-evt-{n}",  # (source, id) is global: the shared database
        "source": "batch-runner",
        "type": "meterline.usage",
        "subject": str(account_id),
        "time": "2026-11-30T12:00:00Z",
        "data": {"model": PRICED, "prompt_tokens": 100 + n, "completion_tokens": 10, **data},
    }


def _post(api: httpx.Client, body: object, content_type: str = BATCH) -> httpx.Response:
    return api.post(
        "/billing/events", content=orjson.dumps(body), headers={"content-type": content_type}
    )


def test_ten_thousand_events_replayed_twice_are_counted_once(
    meterline: Meterline, db: Database
) -> None:
    account_id = uuid.UUID(str(meterline.new_account()["id"]))
    events = [_event(account_id, n) for n in range(10_000)]
    batches = [events[i : i + 1000] for i in range(0, len(events), 1000)]
    with meterline.admin() as api:
        started = time.perf_counter()
        first = [_post(api, batch).json() for batch in batches]
        seconds = time.perf_counter() - started
        again = [_post(api, batch).json() for batch in batches]
        third = [_post(api, batch).json() for batch in batches[::-1]]
        usage = api.get(
            "/billing/usage",
            params={"account_id": str(account_id), "start": "2026-11-30T00:00:00Z"},
        ).json()["data"][0]
    print(f"\n[events] 10,000 events in batches of 1,000: {10_000 / seconds:,.0f} events/s")
    assert sum(b["accepted"] for b in first) == 10_000
    assert sum(b["accepted"] for b in again + third) == 0
    assert sum(b["duplicates"] for b in again + third) == 20_000
    rows = db.fetch(
        "SELECT count(*) AS n, sum(prompt_tokens) AS prompt, sum(cost_usd) AS cost,"
        " count(DISTINCT provider) AS sources FROM usage_ledger WHERE account_id = $1",
        account_id,
    )[0]
    prompt = sum(100 + n for n in range(10_000))
    assert rows["n"] == 10_000 and rows["prompt"] == prompt and rows["sources"] == 1
    # Priced exactly as a proxied row of the same tokens would be.
    assert rows["cost"] == (prompt + 10 * 10_000) * PRICE
    assert usage["requests"] == 10_000 and Decimal(usage["cost_usd"]) == rows["cost"]


def test_one_event_with_its_key_and_task_and_the_same_id_at_another_time(
    meterline: Meterline, db: Database
) -> None:
    account_id, _ = meterline.customer()
    with meterline.admin() as api:
        key_id = api.get(f"/billing/accounts/{account_id}/keys").json()["data"][0]["id"]
        event = _event(account_id, 1, key_id=key_id, task_id="job-7", endpoint="completions")
        stored = _post(api, event, "application/cloudevents+json")
        assert stored.status_code == 200 and stored.json() == {"accepted": 1, "duplicates": 0}
        # The identity is (source, id): another time does not make it another event.
        moved = _post(api, [{**event, "time": "2026-11-30T13:00:00Z"}])
        assert moved.json() == {"accepted": 0, "duplicates": 1}
        # The same id from another source is another event.
        other = _post(api, [{**event, "source": "another-gateway"}], "application/json")
        assert other.json() == {"accepted": 1, "duplicates": 0}
    rows = db.fetch(
        "SELECT key_id, task_id, endpoint, provider, usage_source, cost_usd, occurred_at"
        " FROM usage_ledger WHERE account_id = $1 ORDER BY provider",
        account_id,
    )
    assert [(str(r["key_id"]), r["task_id"], r["endpoint"]) for r in rows] == [
        (key_id, "job-7", "completions")
    ] * 2
    assert [r["provider"] for r in rows] == ["another-gateway", "batch-runner"]
    assert all(r["cost_usd"] == 111 * PRICE for r in rows)


def test_a_customer_key_cannot_report_usage(meterline: Meterline) -> None:
    account_id, key = meterline.customer()
    with httpx.Client(base_url=meterline.url, headers={"Authorization": f"Bearer {key}"}) as own:
        assert _post(own, [_event(account_id, 1)]).status_code == 404


@pytest.mark.parametrize(
    ("change", "status", "param"),
    [
        (lambda e: e["data"].pop("prompt_tokens"), 422, "body.1.data.prompt_tokens"),
        (lambda e: e["data"].update(prompt_tokens=-1), 422, "body.1.data.prompt_tokens"),
        (lambda e: e["data"].update(prompt_tokens="12"), 422, "body.1.data.prompt_tokens"),
        (lambda e: e["data"].update(model="a\x00b"), 422, "body.1.data.model"),
        (lambda e: e["data"].update(colour="red"), 422, "body.1.data.colour"),
        (lambda e: e.update(type="com.example.other"), 422, "body.1.type"),
        (lambda e: e.update(specversion="0.3"), 422, "body.1.specversion"),
        (lambda e: e.update(time="9999-12-31T23:59:59-01:00"), 422, "body.1.time"),
        (lambda e: e.update(subject=str(uuid.uuid4())), 422, "body.1.subject"),
        (lambda e: e["data"].update(key_id=str(uuid.uuid4())), 422, "body.1.data.key_id"),
    ],
)
def test_an_invalid_event_refuses_its_batch_naming_the_event_and_field(
    meterline: Meterline, db: Database, change: Any, status: int, param: str
) -> None:
    account_id = uuid.UUID(str(meterline.new_account()["id"]))
    events = [_event(account_id, 0), _event(account_id, 1)]
    change(events[1])
    with meterline.admin() as api:
        response = _post(api, events)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and "evt-1" in error["message"]
    # All or none: the valid event did not go in either.
    assert db.fetch("SELECT 1 FROM usage_ledger WHERE account_id = $1", account_id) == []


def test_bodies_that_are_not_cloudevents(meterline: Meterline) -> None:
    account_id = uuid.UUID(str(meterline.new_account()["id"]))
    with meterline.admin() as api:
        wrong_type = _post(api, [_event(account_id, 1)], "text/csv")
        assert wrong_type.status_code == 415
        assert wrong_type.json()["error"]["code"] == "unsupported_media_type"
        single_as_list = _post(api, [_event(account_id, 1)], "application/cloudevents+json")
        assert single_as_list.status_code == 422
        list_as_single = _post(api, _event(account_id, 1), BATCH)
        assert list_as_single.status_code == 422
        broken = api.post("/billing/events", content=b"[{", headers={"content-type": BATCH})
        assert broken.status_code == 422 and broken.json()["error"]["param"] == "body"
