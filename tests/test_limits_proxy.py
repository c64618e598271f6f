"""Rate-limit tiers as a customer meets them through the proxy: OpenAI's 429 and headers,
tier defaults and custom limits, token limits, and exact counts across two workers."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.conftest import Meterline, Upstream, start_meterline
from tests.reliability import (
    REAL_TIERS,
    burst,
    meterline_settings,
    new_customer,
    redis_available,
    redis_namespace,
    wait_for_fresh_window,
    wait_for_rows,
)
from tests.support import Database

MODEL = "mock-chat"
HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hello"}]
RESET = re.compile(r"^(\d+ms|\d+s|\d+m\d+s)$")


@pytest.fixture
def server(reliability_server: Meterline) -> Meterline:
    return reliability_server


def _split(results: list[Any]) -> tuple[list[Any], list[openai.APIStatusError]]:
    served = [r for r in results if not isinstance(r, openai.APIStatusError)]
    refused = [r for r in results if isinstance(r, openai.APIStatusError)]
    return served, refused


def test_the_basic_tier_serves_sixty_requests_a_minute(server: Meterline) -> None:
    account_id, _, key = new_customer(server.url)
    wait_for_fresh_window()
    results = asyncio.run(burst(server.v1, key, 70, model=MODEL, messages=HELLO))
    served, refused = _split(results)
    assert (len(served), len(refused)) == (60, 10)

    # Every answer says where the caller stands, as OpenAI's do.
    remaining = sorted(int(r.headers["x-ratelimit-remaining-requests"]) for r in served)
    assert remaining == list(range(60))
    for response in served:
        assert response.headers["x-ratelimit-limit-requests"] == "60"
        assert RESET.match(response.headers["x-ratelimit-reset-requests"])
    for error in refused:
        assert error.status_code == 429
        body: Any = error.body
        assert (body["type"], body["code"]) == ("rate_limit_error", "rate_limit_exceeded")
        assert (
            f"account {account_id}" in body["message"]
            and "60 requests per minute" in (body["message"])
        )
        headers = error.response.headers
        assert 1 <= int(headers["retry-after"]) <= 60
        assert headers["x-ratelimit-limit-requests"] == "60"
        assert headers["x-ratelimit-remaining-requests"] == "0"
        assert RESET.match(headers["x-ratelimit-reset-requests"])
        assert "x-request-id" in headers

    # Refused requests were never forwarded, so they are not in the ledger.
    db = Database(server.database_url)
    time.sleep(0.5)
    rows = wait_for_rows(
        db, "SELECT count(*) FROM usage_ledger WHERE account_id = $1", account_id, count=60
    )
    assert rows == 60


def test_pro_tier_and_custom_limits_of_accounts_and_keys(server: Meterline) -> None:
    _, _, pro_key = new_customer(server.url, tier="pro")
    pro = openai.OpenAI(base_url=server.v1, api_key=pro_key, max_retries=0)
    wait_for_fresh_window()
    raw = pro.chat.completions.with_raw_response.create(model=MODEL, messages=HELLO)
    assert raw.headers["x-ratelimit-limit-requests"] == "600"
    with pro.chat.completions.with_streaming_response.create(
        model=MODEL, messages=HELLO, stream=True
    ) as stream:
        assert stream.headers["x-ratelimit-limit-requests"] == "600"
        assert int(stream.headers["x-ratelimit-remaining-requests"]) == 598

    # An account's own limit replaces its tier's.
    _, _, custom_key = new_customer(server.url, tier="custom", rate_limit_rpm=3)
    wait_for_fresh_window()
    served, refused = _split(
        asyncio.run(burst(server.v1, custom_key, 5, model=MODEL, messages=HELLO))
    )
    assert (len(served), len(refused)) == (3, 2)

    # A key's own limit applies on top of its account's: the key stops, the account goes on.
    account_id, key_id, key = new_customer(server.url, tier="pro")
    Database(server.database_url).execute(
        "UPDATE api_keys SET rate_limit_rpm = 2 WHERE id = $1", key_id
    )
    other = server.new_key(account_id)
    time.sleep(1.0)  # limits are reloaded every 0.5 s here
    wait_for_fresh_window()
    served, refused = _split(asyncio.run(burst(server.v1, key, 4, model=MODEL, messages=HELLO)))
    assert (len(served), len(refused)) == (2, 2)
    body: Any = refused[0].body
    assert f"key {key_id}" in body["message"]
    # The tightest limit is the one reported.
    assert served[0].headers["x-ratelimit-limit-requests"] == "2"
    openai.OpenAI(base_url=server.v1, api_key=other, max_retries=0).chat.completions.create(
        model=MODEL, messages=HELLO
    )


def test_tokens_per_minute_count_the_request_budget_then_what_was_used(
    server: Meterline,
) -> None:
    _, _, key = new_customer(server.url, tier="pro", rate_limit_tpm=200)
    client = openai.OpenAI(base_url=server.v1, api_key=key, max_retries=0)
    wait_for_fresh_window()
    # A request that could never fit is refused outright.
    with pytest.raises(openai.RateLimitError) as too_large:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=500)
    assert "Request too large" in str(too_large.value)
    # 5 + 100 tokens are held at admission; the answer uses 5 + 16, so the window is
    # corrected and far more than one more such request fits in 200.
    for _ in range(4):
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=HELLO, max_tokens=100
        )
        assert raw.headers["x-ratelimit-limit-tokens"] == "200"
        time.sleep(0.1)  # the settlement runs after the response is sent
    with pytest.raises(openai.RateLimitError):
        for _ in range(10):
            client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=100)


@pytest.mark.skipif(not redis_available(), reason="no Redis at 127.0.0.1:6379")
def test_limits_are_exact_across_workers_and_replicas_sharing_redis(
    server: Meterline, upstream: Upstream, tmp_path: Path
) -> None:
    """Two replicas on one Redis, the first with two workers: one limit of 60 for them all."""
    settings = meterline_settings(**REAL_TIERS)
    database = server.database_url
    with (
        redis_namespace() as shared,
        start_meterline(
            database, upstream, tmp_path / "a", "--workers", "2", **settings, **shared
        ) as a,
        start_meterline(database, upstream, tmp_path / "b", **settings, **shared) as b,
    ):
        _, _, key = new_customer(a.url)
        wait_for_workers(a, 2)
        wait_for_fresh_window()

        async def both() -> list[Any]:
            return [
                *await asyncio.gather(
                    burst(a.v1, key, 50, model=MODEL, messages=HELLO),
                    burst(b.v1, key, 50, model=MODEL, messages=HELLO),
                )
            ]

        on_a, on_b = asyncio.run(both())
        served_a, refused_a = _split(on_a)
        served_b, refused_b = _split(on_b)
        served = len(served_a) + len(served_b)
        print(
            f"\n[Redis, replica a with 2 workers + replica b] limit=60 sent=100 "
            f"served={served} (a={len(served_a)}, b={len(served_b)}) "
            f"refused={len(refused_a) + len(refused_b)}"
        )
        assert abs(served - 60) <= 1
        assert all(e.status_code == 429 for e in refused_a + refused_b)
        assert served_a and served_b
        time.sleep(1.5)  # each worker moves its counts to the exported values every second
        assert len(_serving_workers(a)) == 2, "both workers of replica a should have answered"
        # /metrics of replica a sums its two workers: every request it served is counted once.
        scraped = httpx.get(f"{a.url}/metrics").text
        counted = sum(
            float(line.rsplit(" ", 1)[1])
            for line in scraped.splitlines()
            if line.startswith("meterline_requests_total{") and 'status="200"' in line
        )
        assert counted == len(served_a)


def _serving_workers(m: Meterline) -> set[str]:
    """Worker pids that counted requests (served or refused), from Prometheus' files."""
    return {path.stem.rsplit("_", 1)[1] for path in (m.data_dir / "metrics").glob("counter_*.db")}


def wait_for_workers(m: Meterline, count: int, timeout: float = 60.0) -> None:
    """Each worker writes its live gauges once its runtime has started."""
    deadline = time.monotonic() + timeout
    while len(list((m.data_dir / "metrics").glob("gauge_livesum_*.db"))) < count:
        assert time.monotonic() < deadline, f"{count} workers did not start"
        time.sleep(0.1)


def test_limits_do_not_touch_unlimited_accounts(server: Meterline) -> None:
    """A custom tier with no limits of its own sends no rate-limit headers at all."""
    _, _, key = new_customer(server.url, tier="custom")
    response = httpx.post(
        f"{server.v1}/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": MODEL, "messages": HELLO},
    )
    assert response.status_code == 200
    assert not [h for h in response.headers if h.startswith("x-ratelimit-")]
