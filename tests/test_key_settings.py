"""A key's own settings through `PATCH /billing/keys/{id}`: shown by the keys list, applied
by the proxy within `METERLINE_KEY_CACHE_REFRESH_S` (0.5 s on this server)."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import openai
from openai.types.chat import ChatCompletionMessageParam

from tests.conftest import Meterline
from tests.reliability import admin, burst, new_customer, wait_for_fresh_window

MODEL = "mock-chat"
HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hello"}]
REFRESH_S = 0.5  # tests/reliability.py: meterline_settings


def listed(client: httpx.Client, account_id: uuid.UUID, key_id: uuid.UUID) -> dict[str, Any]:
    page = client.get(f"/billing/accounts/{account_id}/keys").json()
    shown: dict[str, Any] = next(k for k in page["data"] if k["id"] == str(key_id))
    return shown


def test_a_key_limit_set_by_patch_is_enforced_by_the_proxy(reliability_server: Meterline) -> None:
    server = reliability_server
    account_id, key_id, key = new_customer(server.url, tier="pro")  # 600 requests a minute
    sdk = openai.OpenAI(base_url=server.v1, api_key=key, max_retries=0)
    sdk.chat.completions.create(model=MODEL, messages=HELLO)  # the directory holds the key now

    with admin(server.url) as client:
        patched = client.patch(f"/billing/keys/{key_id}", json={"rate_limit_rpm": 5})
        assert patched.status_code == 200, patched.text
        assert patched.json()["rate_limit_rpm"] == 5
        assert listed(client, account_id, key_id)["rate_limit_rpm"] == 5

    time.sleep(REFRESH_S + 0.5)
    wait_for_fresh_window(20)
    served = []
    for _ in range(5):
        raw = sdk.chat.completions.with_raw_response.create(model=MODEL, messages=HELLO)
        served.append(raw)
    assert served[-1].headers["x-ratelimit-limit-requests"] == "5"
    try:
        sdk.chat.completions.create(model=MODEL, messages=HELLO)
        raise AssertionError("the 6th request of the minute was served")
    except openai.RateLimitError as error:
        assert error.status_code == 429
        body: Any = error.body
        assert f"key {key_id}" in body["message"]

    # `null` clears the key's own limit: its account's 600 apply again.
    with admin(server.url) as client:
        cleared = client.patch(f"/billing/keys/{key_id}", json={"rate_limit_rpm": None})
        assert cleared.status_code == 200 and cleared.json()["rate_limit_rpm"] is None
    time.sleep(REFRESH_S + 0.5)
    results = asyncio.run(burst(server.v1, key, 3, model=MODEL, messages=HELLO))
    assert not [r for r in results if isinstance(r, openai.APIStatusError)]


def test_patch_changes_only_the_fields_sent(reliability_server: Meterline) -> None:
    server = reliability_server
    account_id, key_id, _key = new_customer(server.url)
    expires = (datetime.now(UTC) + timedelta(days=30)).replace(microsecond=0)
    with admin(server.url) as client:
        first = client.patch(
            f"/billing/keys/{key_id}",
            json={
                "name": "ci",
                "rate_limit_tpm": 1000,
                "monthly_budget_usd": "12.340000000001",
                "expires_at": expires.isoformat(),
            },
        )
        assert first.status_code == 200, first.text
        # Absent fields stay; null clears.
        second = client.patch(f"/billing/keys/{key_id}", json={"name": None})
        shown = second.json()
        assert shown == listed(client, account_id, key_id)
        assert shown["name"] is None and shown["rate_limit_tpm"] == 1000
        assert shown["monthly_budget_usd"] == "12.340000000001"
        assert datetime.fromisoformat(shown["expires_at"]) == expires

        for bad in (
            {"rate_limit_rpm": 0},
            {"rate_limit_rpm": "many"},
            {"monthly_budget_usd": "-1"},
            {"monthly_budget_usd": "1.0000000000001"},
            {"expires_at": "2001-01-01T00:00:00Z"},
            {"prefix": "ml-x"},
        ):
            answer = client.patch(f"/billing/keys/{key_id}", json=bad)
            assert answer.status_code == 422, (bad, answer.text)
        assert client.patch(f"/billing/keys/{uuid.uuid4()}", json={}).status_code == 404

        assert client.delete(f"/billing/keys/{key_id}").status_code == 200
        revoked = client.patch(f"/billing/keys/{key_id}", json={"name": "again"})
        assert revoked.status_code == 409 and revoked.json()["error"]["code"] == "key_revoked"

    # A customer key may not change its own key (403), nor see another's (404).
    _other_account, other_key_id, other_key = new_customer(server.url)
    with httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {other_key}"}
    ) as customer:
        own = customer.patch(f"/billing/keys/{other_key_id}", json={"rate_limit_rpm": 1000})
        assert own.status_code == 403
        assert customer.patch(f"/billing/keys/{key_id}", json={}).status_code == 404
