"""OpenAI's usage and costs APIs (`/v1/organization/usage/…`, `/v1/organization/costs`) read
by a client of OpenAI's documented format, against what `GET /billing/usage` answers for the
same range: the same requests, tokens and exact cost."""

from __future__ import annotations

import itertools
import json
import time
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal

import httpx
import openai
import pytest
from pydantic import BaseModel, ConfigDict

from tests.conftest import Meterline
from tests.support import Database
from tests.test_proxy import HELLO, PRICED, account_rows


# OpenAI's documented shapes, strict: a field Meterline adds or renames fails the test.
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CompletionsResult(_Strict):
    object: Literal["organization.usage.completions.result"]
    input_tokens: int
    output_tokens: int
    input_cached_tokens: int
    input_audio_tokens: int
    output_audio_tokens: int
    num_model_requests: int
    project_id: str | None
    user_id: str | None
    api_key_id: str | None
    model: str | None
    batch: bool | None
    service_tier: str | None


class EmbeddingsResult(_Strict):
    object: Literal["organization.usage.embeddings.result"]
    input_tokens: int
    num_model_requests: int
    project_id: str | None
    user_id: str | None
    api_key_id: str | None
    model: str | None


class Amount(_Strict):
    value: Decimal
    currency: Literal["usd"]


class CostsResult(_Strict):
    object: Literal["organization.costs.result"]
    amount: Amount
    line_item: str | None
    project_id: str | None


class Bucket(_Strict):
    object: Literal["bucket"]
    start_time: int
    end_time: int
    results: list[CompletionsResult | EmbeddingsResult | CostsResult]


class UsagePage(_Strict):
    object: Literal["page"]
    data: list[Bucket]
    has_more: bool
    next_page: str | None


def _pages(api: httpx.Client, path: str, **params: Any) -> list[Bucket]:
    """Every bucket, following `next_page` as OpenAI's clients do."""
    buckets: list[Bucket] = []
    page: str | None = None
    while True:
        response = api.get(path, params={**params, **({"page": page} if page else {})})
        assert response.status_code == 200, response.text
        # Amounts are JSON numbers: read them exactly, as a careful client would.
        parsed = UsagePage.model_validate(json.loads(response.text, parse_float=Decimal))
        buckets += parsed.data
        if not parsed.has_more:
            return buckets
        page = parsed.next_page


def _results(buckets: list[Bucket]) -> list[Any]:
    return [result for bucket in buckets for result in bucket.results]


@pytest.fixture(scope="module")
def usage(meterline: Meterline, db: Database) -> dict[str, Any]:
    """An account with two keys: chat requests from both, streamed and not, and embeddings."""
    account_id, first = meterline.customer()
    second = meterline.new_key(account_id)
    start = int(time.time()) - 120
    for key, count in ((first, 3), (second, 2)):
        client = openai.OpenAI(base_url=meterline.v1, api_key=key, max_retries=0)
        for i in range(count):
            client.chat.completions.create(model=PRICED, messages=HELLO, stream=i == 1)
        client.embeddings.create(model="mock-embed", input=["one text"])
    account_rows(db, account_id, 7)
    end = int(time.time()) + 60
    with meterline.admin() as api:
        billing = api.get(
            "/billing/usage",
            params={
                "account_id": str(account_id),
                "start": datetime.fromtimestamp(start, UTC).isoformat(),
                "end": datetime.fromtimestamp(end, UTC).isoformat(),
            },
        ).json()["data"][0]
    return {"account_id": account_id, "start": start, "end": end, "billing": billing}


def test_usage_and_costs_answer_the_billing_apis_totals(
    meterline: Meterline, usage: dict[str, Any]
) -> None:
    billing = usage["billing"]
    window = {"start_time": usage["start"], "end_time": usage["end"]}
    scope = {"project_ids": str(usage["account_id"])}
    with meterline.admin() as api:
        chats = _results(
            _pages(api, "/v1/organization/usage/completions", bucket_width="1h", **window, **scope)
        )
        embeddings = _results(
            _pages(api, "/v1/organization/usage/embeddings", bucket_width="1h", **window, **scope)
        )
        costs = _results(_pages(api, "/v1/organization/costs", **window, **scope))
    assert sum(r.num_model_requests for r in chats) == 5
    assert sum(r.num_model_requests for r in embeddings) == 2
    assert sum(r.num_model_requests for r in chats + embeddings) == billing["requests"]
    assert sum(r.input_tokens for r in chats + embeddings) == billing["prompt_tokens"]
    assert sum(r.output_tokens for r in chats) == billing["completion_tokens"]
    assert sum(r.input_cached_tokens for r in chats) == billing["cached_tokens"]
    charged = sum((r.amount.value for r in costs), Decimal(0))
    assert charged == Decimal(billing["cost_usd"]) and charged > 0


def test_buckets_of_a_minute_page_through_the_range_and_group_by_key(
    meterline: Meterline, usage: dict[str, Any]
) -> None:
    window = {"start_time": usage["start"], "end_time": usage["end"]}
    scope = {"project_ids": str(usage["account_id"])}
    with meterline.admin() as api:
        buckets = _pages(
            api,
            "/v1/organization/usage/completions",
            bucket_width="1m",
            limit=1,
            group_by=["api_key_id", "model"],
            **window,
            **scope,
        )
        keys = api.get(f"/billing/accounts/{usage['account_id']}/keys").json()["data"]
    # Every minute of the range, in order, each starting where the last ended.
    assert len(buckets) == -(-(usage["end"] - usage["start"]) // 60)
    assert buckets[0].start_time == usage["start"] and buckets[-1].end_time == usage["end"]
    assert all(a.end_time == b.start_time for a, b in itertools.pairwise(buckets))
    per_key: dict[str | None, int] = {}
    for result in _results(buckets):
        assert isinstance(result, CompletionsResult) and result.model == PRICED
        assert result.project_id is None  # not grouped by project
        per_key[result.api_key_id] = per_key.get(result.api_key_id, 0) + result.num_model_requests
    assert sorted(per_key.values()) == [2, 3]
    assert set(per_key) == {k["id"] for k in keys}


def test_a_customer_key_reads_only_its_own_account(
    meterline: Meterline, usage: dict[str, Any]
) -> None:
    _, key = meterline.customer()
    window = {"start_time": usage["start"], "end_time": usage["end"]}
    with httpx.Client(base_url=meterline.url, headers={"Authorization": f"Bearer {key}"}) as own:
        mine = own.get("/v1/organization/usage/completions", params=window)
        assert mine.status_code == 200
        assert _results(UsagePage.model_validate(mine.json()).data) == []
        other = own.get(
            "/v1/organization/costs", params={**window, "project_ids": str(usage["account_id"])}
        )
        assert other.status_code == 404


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"bucket_width": "2d"}, "query.bucket_width"),
        ({"bucket_width": "1d", "limit": 32}, "query.limit"),
        ({"bucket_width": "1m", "limit": 1441}, "query.limit"),
        ({"end_time": 1}, "query.end_time"),
        ({"start_time": 10**12}, "query.start_time"),
        ({"page": "page_bm90IGEgcGFnZQ"}, "query.page"),
        ({"group_by": "project_id,color"}, "query.group_by"),
        ({"project_ids": "not-a-uuid"}, "query.project_ids.0"),  # the first item
    ],
)
def test_bad_parameters_are_a_422_naming_them(
    meterline: Meterline, params: dict[str, Any], param: str
) -> None:
    with meterline.admin() as api:
        response = api.get(
            "/v1/organization/usage/completions",
            params={"start_time": int(time.time()) - 3600, **params},
        )
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == param


def test_costs_come_in_days_only(meterline: Meterline) -> None:
    with meterline.admin() as api:
        response = api.get(
            "/v1/organization/costs",
            params={"start_time": int(time.time()) - 3600, "bucket_width": "1h"},
        )
    assert response.status_code == 422
    assert response.json()["error"]["param"] == "query.bucket_width"
