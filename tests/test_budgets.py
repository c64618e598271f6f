"""Monthly budgets as a customer meets them: 429 `insufficient_quota` before anything is spent
past the budget, even when a hundred requests arrive at once, on one worker or across two
sharing Redis; and a restarted server remembers what was spent (from the ledger)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from service.limits.policy import month_bounds, month_of
from tests.conftest import Upstream, start_meterline
from tests.reliability import (
    add_price,
    burst,
    meterline_settings,
    new_customer,
    own_database,
    redis_available,
    redis_namespace,
    wait_for_rows,
)
from tests.support import Database

# $1,000 per million tokens: one token costs a tenth of a cent, so the numbers read easily.
MODEL = "meta-llama/budget-test"
PRICE = Decimal(1000)
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say something"}]
# The mock generates 16 words and honours max_tokens: the completion uses its whole budget,
# so each request really costs close to what it reserves.
MAX_TOKENS = 16
# What a request reserves: the prompt estimate (4 tokens per message, its role's 1 and its
# content's 2, and 3 that prime the reply) plus max_tokens, at list price.
WORST_CASE = (4 + 1 + 2 + 3 + MAX_TOKENS) * PRICE / 1_000_000
BUDGET = 10 * WORST_CASE
# Requests stay in flight long enough for all hundred to be there at once.
SLOW = {"mock": {"delay_ms": 300}}


@pytest.fixture(scope="module")
def database(postgres_server: str, template_database: str) -> Iterator[str]:
    with own_database(postgres_server, template_database) as url:
        add_price(Database(url), MODEL, PRICE)
        yield url


def spent(db: Database, account_id: uuid.UUID) -> Decimal:
    return Decimal(
        db.fetchval(
            "SELECT COALESCE(SUM(cost_usd), 0) FROM usage_ledger WHERE account_id = $1",
            account_id,
        )
    )


def _hundred_against_a_budget_of_ten(url: str, db: Database, label: str) -> uuid.UUID:
    account_id, _, key = new_customer(url, monthly_budget_usd=str(BUDGET))
    results = asyncio.run(
        burst(
            f"{url}/v1",
            key,
            100,
            model=MODEL,
            messages=MESSAGES,
            max_tokens=MAX_TOKENS,
            extra_body=SLOW,
        )
    )
    served = [r for r in results if not isinstance(r, openai.APIStatusError)]
    refused = [r for r in results if isinstance(r, openai.APIStatusError)]
    recorded = wait_for_rows(
        db,
        "SELECT count(*) FROM usage_ledger WHERE account_id = $1",
        account_id,
        count=len(served),
    )
    total = spent(db, account_id)
    overshoot = max(total - BUDGET, Decimal(0))
    print(
        f"\n[{label}] budget={BUDGET} worst_case={WORST_CASE} served={len(served)} "
        f"refused={len(refused)} recorded={recorded} spent={total} overshoot={overshoot}"
    )
    assert recorded == len(served)
    # Ten fit; what each really cost frees less than one more worst case.
    assert len(served) == 10
    assert total <= BUDGET  # reservations never let spend pass the budget
    assert overshoot <= WORST_CASE
    for error in refused:
        _assert_budget_refusal(error, "account", account_id)
    return account_id


def _assert_budget_refusal(error: openai.APIStatusError, scope: str, owner: uuid.UUID) -> None:
    assert error.status_code == 429
    body: Any = error.body
    assert body["code"] == "insufficient_quota"
    assert body["type"] == "insufficient_quota"
    assert f"monthly budget of {scope} {owner}" in body["message"]
    reset = month_bounds(month_of(datetime.now(UTC)))[1]
    assert f"resets at {reset:%Y-%m-%dT%H:%M:%SZ}" in body["message"]
    assert int(error.response.headers["retry-after"]) > 0


def test_a_hundred_requests_against_a_budget_that_fits_ten(
    database: str, upstream: Upstream, tmp_path: Path
) -> None:
    db = Database(database)
    with start_meterline(database, upstream, tmp_path / "a", **meterline_settings()) as m:
        account_id = _hundred_against_a_budget_of_ten(m.url, db, "in process, 1 worker")
    before = spent(db, account_id)

    # A new server knows nothing in memory: it starts from the ledger's sum for the month.
    # A request whose worst case fits the whole budget but not what is left is refused.
    larger = 100
    assert BUDGET - before < (10 + larger) * PRICE / 1_000_000 < BUDGET
    with start_meterline(database, upstream, tmp_path / "b", **meterline_settings()) as m:
        key = m.new_key(account_id)
        client = openai.OpenAI(base_url=m.v1, api_key=key, max_retries=0)
        with pytest.raises(openai.RateLimitError) as refused:
            client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=larger)
        _assert_budget_refusal(refused.value, "account", account_id)
    assert spent(db, account_id) == before


@pytest.mark.skipif(not redis_available(), reason="no Redis at 127.0.0.1:6379")
def test_a_hundred_requests_across_two_workers_sharing_redis(
    database: str, upstream: Upstream, tmp_path: Path
) -> None:
    db = Database(database)
    with (
        redis_namespace() as shared,
        start_meterline(
            database,
            upstream,
            tmp_path,
            "--workers",
            "2",
            **meterline_settings(),
            **shared,
        ) as m,
    ):
        _hundred_against_a_budget_of_ten(m.url, db, "Redis, 2 workers")


def test_a_key_budget_stops_that_key_only(
    database: str, upstream: Upstream, tmp_path: Path
) -> None:
    db = Database(database)
    with start_meterline(database, upstream, tmp_path, **meterline_settings()) as m:
        account_id, key_id, key = new_customer(m.url, monthly_budget_usd="100")
        db.execute(
            "UPDATE api_keys SET monthly_budget_usd = $1 WHERE id = $2", 2 * WORST_CASE, key_id
        )
        other = m.new_key(account_id)
        time.sleep(1.0)  # limits are reloaded every 0.5 s here (every 5 s by default)
        limited = openai.OpenAI(base_url=m.v1, api_key=key, max_retries=0)
        for _ in range(2):
            limited.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS)
        with pytest.raises(openai.RateLimitError) as refused:
            limited.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS)
        _assert_budget_refusal(refused.value, "key", key_id)
        # The account's budget is far from spent: its other keys carry on.
        openai.OpenAI(base_url=m.v1, api_key=other, max_retries=0).chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS
        )
