"""Monthly budgets as a customer meets them: 429 `insufficient_quota` before anything is spent
past the budget, even when a hundred requests arrive at once, on one worker or across two
sharing Redis; and a restarted server remembers what was spent (from the ledger).

Budgets are hard: requests that set no completion limit are capped to what the budget
pays, a provider that ignores `max_tokens` has its streams cut, a budget whose spend cannot
be read is not admitted against, and the spend counts fixed prices of accepted quotes,
adjustments and usage priced after it was recorded."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

import httpx
import openai
import pytest
import redis
from openai.types.chat import ChatCompletionMessageParam
from sqlalchemy.ext.asyncio import AsyncEngine

from pricing.invoice import BillingPeriod
from pricing.prices import PriceBook
from service.auth.key_cache import KeyLimits
from service.db.engine import create_engine, session_factory, transaction
from service.invoices import service as invoices
from service.limits.budgets import Hold
from service.limits.counters import MemoryCounters
from service.limits.repository import budget_spend
from service.limits.service import Grant, Limits
from service.prices.cache import PriceCache
from service.reports.review import service as flagged
from service.settings import Settings
from tests.conftest import Meterline, Upstream, start_meterline
from tests.reliability import (
    REDIS_URL,
    StoppablePostgres,
    add_price,
    admin,
    burst,
    meterline_settings,
    new_customer,
    own_database,
    redis_available,
    redis_namespace,
    wait_for_rows,
)
from tests.support import Database
from tests.usage_rows import insert_usage, usage_row

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


# A model priced like a small hosted one ($2 per million tokens): 4,096 tokens cost less
# than a cent, the 10,000 a model writes when nothing stops it two cents.
LONG_MODEL = "meta-llama/budget-long"
LONG_PRICE = Decimal(2)
TOKEN = LONG_PRICE / 1_000_000
FIVE_CENTS = Decimal("0.05")
DEFAULT_COMPLETION = 4096  # METERLINE_BUDGET_DEFAULT_COMPLETION_TOKENS


@pytest.fixture(scope="module")
def database(postgres_server: str, template_database: str) -> Iterator[str]:
    with own_database(postgres_server, template_database) as url:
        add_price(Database(url), MODEL, PRICE)
        add_price(Database(url), LONG_MODEL, LONG_PRICE)
        yield url


def spent(db: Database, account_id: uuid.UUID) -> Decimal:
    return Decimal(
        db.fetchval(
            "SELECT COALESCE(SUM(cost_usd), 0) FROM usage_ledger WHERE account_id = $1",
            account_id,
        )
    )


def _hundred_at_once(
    url: str, db: Database, account_id: uuid.UUID, key: str
) -> tuple[list[Any], list[openai.APIStatusError], int]:
    """A hundred requests of `key` in flight together: those served, those refused, and the
    ledger rows recorded for the account once the served ones are in."""
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
    return served, refused, recorded


def _hundred_against_a_budget_of_ten(url: str, db: Database, label: str) -> uuid.UUID:
    account_id, _, key = new_customer(url, monthly_budget_usd=str(BUDGET))
    served, refused, recorded = _hundred_at_once(url, db, account_id, key)
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
    reset = BillingPeriod.of(datetime.now(UTC)).end
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


def test_a_budget_on_a_rate_card_reserves_the_accounts_own_price(
    database: str, upstream: Upstream, tmp_path: Path
) -> None:
    """An account charged twice the list price (a rate card's 100 % markup) has its requests
    reserved at what it pays: half as many fit its budget, and its spend stays within it.
    Reserved at the list price, ten would be admitted and spend twice the budget."""
    db = Database(database)
    with start_meterline(database, upstream, tmp_path, **meterline_settings()) as m:
        with admin(m.url) as client:
            card = client.post(
                "/billing/rate-cards",
                json={
                    "name": f"double-{uuid.uuid4().hex[:8]}",
                    "markup_pct": "100",
                    "markup_basis": "list_price",
                    "effective_from": "2000-01-01T00:00:00Z",
                },
            )
            card.raise_for_status()
        account_id, _, key = new_customer(
            m.url, monthly_budget_usd=str(BUDGET), rate_card_id=card.json()["id"]
        )
        served, refused, recorded = _hundred_at_once(m.url, db, account_id, key)
    total = spent(db, account_id)
    listed = db.fetchval(
        "SELECT sum((prompt_tokens + completion_tokens) * $2::numeric / 1000000) FROM usage_ledger"
        " WHERE account_id = $1",
        account_id,
        PRICE,
    )
    print(
        f"\n[rate card x2] budget={BUDGET} served={len(served)} refused={len(refused)}"
        f" spent={total} list={listed}"
    )
    assert recorded == len(served)
    assert total == 2 * listed  # billed at the account's price
    assert len(served) == 5  # each worst case costs twice what it does at list price
    assert total <= BUDGET
    for error in refused:
        _assert_budget_refusal(error, "account", account_id)


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


# -- hard budgets: twelve requests at once against five cents ----------------------------


@dataclass
class Answer:
    """What the client saw of one request."""

    stream: bool
    status: int = 0
    capped: int | None = None  # x-meterline-max-tokens-capped
    error: str | None = None  # code of the error answered, or of the event ending a stream
    request_id: str | None = None  # x-request-id: its ledger row's key
    failure: str | None = None  # an error the client raised without a status (connection)


def _capped(headers: httpx.Headers) -> int | None:
    value = headers.get("x-meterline-max-tokens-capped")
    return None if value is None else int(value)


def _code(body: object) -> str | None:
    return str(body.get("code")) if isinstance(body, dict) else None


async def _twelve_at_once(base_url: str, key: str, **create: Any) -> list[Answer]:
    """Twelve concurrent chat completions, every other one streamed (read to its end)."""
    client = openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=120)

    async def one(stream: bool) -> Answer:
        answer = Answer(stream)
        try:
            if stream:
                async with client.chat.completions.with_streaming_response.create(
                    stream=True, **create
                ) as response:
                    answer.status, answer.capped = response.status_code, _capped(response.headers)
                    answer.request_id = response.headers.get("x-request-id")
                    async for _ in await response.parse():
                        pass
            else:
                raw = await client.chat.completions.with_raw_response.create(**create)
                answer.status, answer.capped = raw.status_code, _capped(raw.headers)
                answer.request_id = raw.headers.get("x-request-id")
        except openai.APIStatusError as error:
            answer.status, answer.error = error.status_code, _code(error.body)
            answer.request_id = error.response.headers.get("x-request-id")
        except openai.APIConnectionError as error:  # no answer at all: say which and why
            answer.failure = f"{type(error).__name__}: {error!r} {error.__cause__!r}"
        except openai.APIError as error:  # the error event that ends a cut stream
            answer.error = _code(error.body)
        return answer

    try:
        return list(await asyncio.gather(*(one(i % 2 == 0) for i in range(12))))
    finally:
        await client.close()


def _against_five_cents(
    m: Meterline, db: Database, label: str, slack_per_stream: Decimal, **create: Any
) -> tuple[list[Answer], list[dict[str, Any]]]:
    """Twelve requests at once on a fresh account with a $0.05 budget: month spend stays
    within it (plus `slack_per_stream` per stream served); the others are refused."""
    account_id, _, key = new_customer(m.url, monthly_budget_usd=str(FIVE_CENTS))
    create = {"model": LONG_MODEL, "messages": MESSAGES, **create}
    answers = asyncio.run(_twelve_at_once(m.v1, key, **create))
    served = [a for a in answers if a.status == 200]
    wait_for_rows(
        db, "SELECT count(*) FROM usage_ledger WHERE account_id = $1", account_id, count=len(served)
    )
    rows = db.fetch(
        "SELECT request_id, stream, status_code, error_code, completion_tokens, cost_usd "
        "FROM usage_ledger WHERE account_id = $1",
        account_id,
    )
    total = sum((r["cost_usd"] for r in rows), Decimal(0))
    streams = sum(a.stream for a in served)
    print(
        f"\n[{label}] budget={FIVE_CENTS} served={len(served)} (streams={streams}) "
        f"refused={12 - len(served)} spent={total} "
        f"capped={sorted(a.capped for a in served if a.capped is not None)} "
        f"completion_tokens={sorted(r['completion_tokens'] for r in rows)}"
    )
    # Every row is a request the client was served, and every served request has its row.
    assert {r["request_id"] for r in rows} == {a.request_id for a in served}, (answers, rows)
    assert 0 < len(served) < 12
    assert all(
        (a.status, a.error) == (429, "insufficient_quota") for a in answers if a not in served
    )
    assert total <= FIVE_CENTS + streams * slack_per_stream
    return served, rows


def _budgets_hold_against_long_answers(m: Meterline, db: Database, store: str) -> None:
    # 1. Nothing stops the model but the budget: every request is capped to what it pays.
    slow = {"delay_ms": 1000}  # every request is in flight before the first one settles
    served, rows = _against_five_cents(
        m,
        db,
        f"{store}: no max_tokens, 10,000 tokens when unlimited",
        Decimal(0),
        extra_body={"mock": {"unlimited_tokens": 10_000, "chunks": 10_000, **slow}},
    )
    caps = [a.capped for a in served]
    assert all(cap is not None and 0 < cap <= DEFAULT_COMPLETION for cap in caps)
    assert any(cap is not None and cap < DEFAULT_COMPLETION for cap in caps)  # what was left
    assert max(r["completion_tokens"] for r in rows) <= DEFAULT_COMPLETION
    assert all(a.error is None for a in served)

    # 2. The larger of the two limits is reserved (the mock honours max_tokens).
    served, _ = _against_five_cents(
        m,
        db,
        f"{store}: max_completion_tokens 1 with max_tokens 10,000",
        Decimal(0),
        max_tokens=10_000,
        max_completion_tokens=1,
        extra_body={"mock": {"chunks": 10_000, **slow}},
    )
    assert len(served) <= int(FIVE_CENTS / (10_000 * TOKEN)) and all(
        a.capped is None for a in served
    )

    # 3. A provider that ignores max_tokens when streaming: its streams are cut, one chunk
    #    (one token here) past what their reservation pays at most.
    served, rows = _against_five_cents(
        m,
        db,
        f"{store}: no max_tokens, the provider ignores max_tokens when streaming",
        TOKEN,
        extra_body={"mock": {"ignore_max_tokens": True, "chunks": 10_000, **slow}},
    )
    streams = [a for a in served if a.stream]
    assert streams and all(a.error == "max_tokens_exceeded" for a in streams)
    assert all(a.error is None for a in served if not a.stream)
    cut = [(r["status_code"], r["error_code"]) for r in rows if r["stream"]]
    assert cut == [(502, "max_tokens_exceeded")] * len(streams)


def test_twelve_requests_without_a_limit_stay_within_five_cents_in_process(
    database: str, upstream: Upstream, tmp_path: Path
) -> None:
    with start_meterline(database, upstream, tmp_path, **meterline_settings()) as m:
        _budgets_hold_against_long_answers(m, Database(database), "in process")


@pytest.mark.skipif(not redis_available(), reason="no Redis at 127.0.0.1:6379")
def test_twelve_requests_without_a_limit_stay_within_five_cents_across_two_workers(
    database: str, upstream: Upstream, tmp_path: Path
) -> None:
    with (
        redis_namespace() as shared,
        start_meterline(
            database, upstream, tmp_path, "--workers", "2", **meterline_settings(), **shared
        ) as m,
    ):
        _budgets_hold_against_long_answers(m, Database(database), "Redis, 2 workers")


# -- what counts as spent ------------------------------------------------------------------


def _refused_spent(client: openai.OpenAI, max_tokens: int = MAX_TOKENS, **create: Any) -> str:
    """The budget refusal of a request, as the figure it says was spent."""
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=max_tokens, **create
        )
    body: Any = refused.value.body
    assert body["code"] == "insufficient_quota"
    return str(body["message"]).split("(", 2)[2].split(" USD spent")[0]


def _quote(api: httpx.Client, account_id: uuid.UUID) -> dict[str, Any]:
    # 10 + 20 tokens at $1,000/M = $0.03, plus the 20 % margin, rounded up: $0.04.
    response = api.post(
        "/billing/quotes",
        json={
            "account_id": str(account_id),
            "task_type": "budget",
            "model": MODEL,
            "prompt_tokens": 10,
            "max_completion_tokens": 20,
        },
    )
    response.raise_for_status()
    quote: dict[str, Any] = response.json()
    assert quote["price_usd"] == "0.04"
    return quote


def test_an_accepted_quote_holds_its_fixed_price_and_its_tokens_count_once(
    database: str, upstream: Upstream, tmp_path: Path
) -> None:
    db = Database(database)
    worst = (4 + 1 + 2 + 3) * PRICE / 1_000_000  # the prompt's share of a worst case
    with start_meterline(database, upstream, tmp_path / "a", **meterline_settings()) as m:
        account_id, _, key = new_customer(m.url, monthly_budget_usd="0.07")
        client = openai.OpenAI(base_url=m.v1, api_key=key, max_retries=0)
        with admin(m.url) as api:
            accepted = api.post(
                f"/billing/quotes/{_quote(api, account_id)['id']}/accept", json={"task_id": "t1"}
            )
            assert accepted.status_code == 201
            # $0.03 is left: a second $0.04 quote cannot be accepted, and opens no task.
            second = api.post(
                f"/billing/quotes/{_quote(api, account_id)['id']}/accept", json={"task_id": "t2"}
            )
            assert second.status_code == 429
            assert second.json()["error"]["code"] == "insufficient_quota"
            task = api.get("/billing/tasks/t2", params={"account_id": str(account_id)})
            assert task.status_code == 404
        # A request that would fit $0.07 but not the $0.03 left is refused.
        assert worst + 30 * PRICE / 1_000_000 > Decimal("0.03")
        assert _refused_spent(client, max_tokens=30) == "0.04"
        # The quoted task's requests are paid by its fixed price: they reserve nothing and
        # their tokens ($0.02 each) are not spent a second time.
        for _ in range(3):
            client.chat.completions.create(
                model=MODEL,
                messages=MESSAGES,
                max_tokens=MAX_TOKENS,
                extra_headers={"X-Task-Id": "t1"},
            )
        time.sleep(0.2)  # settlements run after the responses
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS)
        wait_for_rows(
            db, "SELECT count(*) FROM usage_ledger WHERE account_id = $1", account_id, count=4
        )
    # A new server reads the same from the ledger: the fixed price and the one request
    # outside the task ($0.04 + $0.02), not the task's tokens.
    with start_meterline(database, upstream, tmp_path / "b", **meterline_settings()) as m:
        client = openai.OpenAI(base_url=m.v1, api_key=m.new_key(account_id), max_retries=0)
        assert _refused_spent(client) == "0.06"


def test_adjustments_and_usage_priced_later_count_against_the_budget(
    database: str, upstream: Upstream, tmp_path: Path
) -> None:
    db = Database(database)
    later = f"unpriced/budget-later-{uuid.uuid4().hex[:6]}"
    settings = meterline_settings(METERLINE_BUDGET_RESYNC_S="0.5")
    with start_meterline(database, upstream, tmp_path, **settings) as m:
        # Usage on a model without a price yet: reserved and settled at $0.
        priced_later, _, key = new_customer(m.url, monthly_budget_usd="0.05")
        client = openai.OpenAI(base_url=m.v1, api_key=key, max_retries=0)
        for _ in range(5):
            client.chat.completions.create(model=later, messages=MESSAGES, max_tokens=MAX_TOKENS)
        wait_for_rows(
            db, "SELECT count(*) FROM usage_ledger WHERE account_id = $1", priced_later, count=5
        )
        # A price dated before them: five times 20 tokens at $1,000/M is $0.10 of usage.
        with admin(m.url) as api:
            api.post(
                "/billing/prices",
                json={
                    "model": later,
                    "input_usd_per_mtok": "1000",
                    "output_usd_per_mtok": "1000",
                    "effective_from": "2020-01-01T00:00:00Z",
                },
            ).raise_for_status()
        # A debit adjustment of $0.05 on another account.
        adjusted, _, other = new_customer(m.url, monthly_budget_usd="0.05")
        insert_usage(
            db,
            usage_row(
                adjusted,
                datetime.now(UTC),
                prompt=0,
                completion=0,
                kind="adjustment",
                cost="0.05",
                model="adjustment",
                provider=None,
            ),
        )
        time.sleep(2.0)  # a resync or two (every 0.5 s here)
        assert _refused_spent(client) == "0.1"
        assert _refused_spent(openai.OpenAI(base_url=m.v1, api_key=other, max_retries=0)) == "0.05"


@pytest.mark.skipif(not redis_available(), reason="no Redis at 127.0.0.1:6379")
def test_a_redis_that_comes_back_empty_is_synced_from_the_ledger(
    database: str, upstream: Upstream, tmp_path: Path
) -> None:
    db = Database(database)
    with (
        redis_namespace() as shared,
        start_meterline(database, upstream, tmp_path, **meterline_settings(), **shared) as m,
    ):
        account_id, _, key = new_customer(m.url, monthly_budget_usd=str(3 * WORST_CASE))
        client = openai.OpenAI(base_url=m.v1, api_key=key, max_retries=0)
        for _ in range(3):
            client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS)
        wait_for_rows(
            db, "SELECT count(*) FROM usage_ledger WHERE account_id = $1", account_id, count=3
        )
        # Redis restarts with nothing (no persistence): every key of this deployment is gone.
        flushed = redis.Redis.from_url(REDIS_URL)
        try:
            flushed.delete(*flushed.scan_iter(match=f"{shared['METERLINE_REDIS_PREFIX']}*"))
        finally:
            flushed.close()
        # The next request finds its budget unsynced and reads the month from the ledger.
        assert _refused_spent(client) == str(spent(db, account_id).normalize())


# -- when the counters cannot be trusted ---------------------------------------------------


@pytest.fixture
def stoppable_postgres() -> Iterator[StoppablePostgres]:
    """A Postgres of this test's own, which it stops (never the shared server)."""
    # Not under pytest's temporary root (0700): Postgres may run as another user.
    root = Path(tempfile.mkdtemp(prefix="meterline-budgets-"))
    server = StoppablePostgres(root)
    server.start()
    try:
        yield server
    finally:
        server.close()
        shutil.rmtree(root, ignore_errors=True)


def test_a_budget_first_used_while_the_database_is_down_admits_nothing(
    stoppable_postgres: StoppablePostgres, upstream: Upstream, tmp_path: Path
) -> None:
    """A process whose budget counter was never read from the ledger (it started, then
    Postgres went down) must not admit as if nothing had been spent: 503, retry later."""
    url = stoppable_postgres.url
    with start_meterline(url, upstream, tmp_path, **meterline_settings()) as m:
        db = Database(url)
        add_price(db, MODEL, PRICE)
        account_id, _, key = new_customer(m.url, monthly_budget_usd=str(BUDGET))
        # The month is spent already (by another process, say), and nothing here knows it.
        insert_usage(db, usage_row(account_id, datetime.now(UTC), cost=str(BUDGET), model=MODEL))
        time.sleep(1.5)  # keys, limits and prices are reloaded every 0.5 s here
        client = openai.OpenAI(base_url=m.v1, api_key=key, max_retries=0)
        stoppable_postgres.stop()
        try:
            for _ in range(2):  # the first waits for the ledger, the next is told at once
                with pytest.raises(openai.InternalServerError) as unavailable:
                    client.chat.completions.create(
                        model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS
                    )
                assert unavailable.value.status_code == 503
                body: Any = unavailable.value.body
                assert body["code"] == "budget_unavailable"
                assert f"monthly budget of account {account_id}" in body["message"]
                assert int(unavailable.value.response.headers["retry-after"]) > 0
        finally:
            stoppable_postgres.restart()
        # Back: the budget is read from the ledger, and found spent.
        deadline = time.monotonic() + 30
        while True:
            try:
                assert _refused_spent(client) == str(BUDGET.normalize())
                break
            except openai.InternalServerError:
                assert time.monotonic() < deadline, "the budget was never synced again"
                time.sleep(0.5)
    assert spent(db, account_id) == BUDGET


def test_two_workers_without_redis_warn_that_limits_are_per_process(
    database: str, upstream: Upstream, tmp_path: Path
) -> None:
    with start_meterline(database, upstream, tmp_path, "--workers", "2") as m:
        deadline = time.monotonic() + 30
        while "event=limits_per_worker" not in m.log.read_text():
            assert time.monotonic() < deadline, "no warning that limits are per process"
            time.sleep(0.2)
        line = next(x for x in m.log.read_text().splitlines() if "limits_per_worker" in x)
    assert "level=WARNING" in line and "workers=2" in line
    assert "limits are per process" in line and "METERLINE_REDIS_URL" in line


# -- what the ledger says a month spent, against what its invoice bills --------------------

SPEND_MONTH = BillingPeriod(2025, 3)


def _task(
    db: Database, account: uuid.UUID, external_id: str, status: str, billed_as: str | None
) -> None:
    """A quoted task accepted on 3 March at a fixed price of $0.10, as completing it (or
    not) leaves it, completed on 20 March."""
    accepted = datetime(2025, 3, 3, tzinfo=UTC)
    quote = db.fetchval(
        "INSERT INTO quotes (account_id, task_type, model, basis, sample_size, confidence,"
        " margin, expected_cost_usd, quantile_cost_usd, price_usd, valid_until, accepted_at)"
        " VALUES ($1, 'summarize', $2, 'estimate', 0, 0.9, 0.2, 0.01, 0.01, 0.10, $3, $3)"
        " RETURNING id",
        account,
        MODEL,
        accepted,
    )
    db.execute(
        "INSERT INTO tasks (account_id, external_id, task_type, model, quote_id,"
        " fixed_price_usd, status, completed_at, created_at, expires_at, billed_as)"
        " VALUES ($1, $2, 'summarize', $3, $4, 0.10, $5, $6, $7,"
        " $7::timestamptz + interval '30 days', $8)",
        account,
        external_id,
        MODEL,
        quote,
        status,
        None if status == "open" else datetime(2025, 3, 20, tzinfo=UTC),
        accepted,
        billed_as,
    )


def _month_spend(url: str, account: uuid.UUID) -> Decimal:
    async def read() -> Decimal:
        engine = create_engine(url, pool_size=1)
        try:
            async with engine.connect() as connection:
                spent = await budget_spend(
                    connection, [account], None, SPEND_MONTH.start, SPEND_MONTH.end, PriceBook([])
                )
        finally:
            await engine.dispose()
        return spent.get(account, Decimal(0))

    return asyncio.run(read())


def _draft_exact_total(url: str, account: uuid.UUID) -> Decimal:
    async def draft() -> Decimal:
        engine = create_engine(url, pool_size=1)
        try:
            async with transaction(session_factory(engine)) as session:
                now = datetime(2025, 3, 25, tzinfo=UTC)
                result = await invoices.generate(session, SPEND_MONTH, [account], now=now)
                invoice = await invoices.get(session, result.invoice_ids[account])
                return sum((line.amount_exact_usd for line in invoice.lines), Decimal(0))
        finally:
            await engine.dispose()

    return asyncio.run(draft())


@pytest.mark.parametrize(
    ("status", "billed_as", "spend"),
    [
        ("open", None, "0.11"),  # the fixed price, reserved at acceptance
        ("succeeded", "fixed_price", "0.11"),
        ("failed", "free", "0.01"),  # neither its tokens nor its price: it bills nothing
        ("failed", "cost", "0.26"),
        ("expired", "fixed_price", "0.11"),
        ("expired", "cost", "0.26"),  # its tokens, not the price it will not be billed
        ("expired", "free", "0.01"),
    ],
)
def test_a_quoted_task_counts_against_the_budget_as_it_is_billed(
    fresh_database_url: str, status: str, billed_as: str | None, spend: str
) -> None:
    db = Database(fresh_database_url)
    account = db.fetchval("INSERT INTO accounts (name) VALUES ('spend') RETURNING id")
    _task(db, account, "quoted", status, billed_as)
    at = datetime(2025, 3, 10, tzinfo=UTC)
    insert_usage(
        db,
        usage_row(account, at, cost="0.15", model=MODEL, task_id="quoted"),
        usage_row(account, at, cost="0.10", model=MODEL, task_id="quoted"),
        usage_row(account, at, cost="0.01", model=MODEL),  # outside the task
    )
    assert _month_spend(fresh_database_url, account) == Decimal(spend)
    if status != "open":
        # What the month's invoice bills, exactly: the budget counted the same.
        assert _draft_exact_total(fresh_database_url, account) == Decimal(spend)


def test_a_flagged_claim_counts_against_the_budget_once_reviewed_as_billed(
    fresh_database_url: str,
) -> None:
    db = Database(fresh_database_url)
    at = datetime(2025, 3, 10, tzinfo=UTC)
    accounts = [
        db.fetchval("INSERT INTO accounts (name) VALUES ('flagged') RETURNING id") for _ in range(3)
    ]
    claims = [
        usage_row(account, at, completion=4_294_967_295, cost="4294.97", flag="implausible_count")
        for account in accounts
    ]
    insert_usage(db, *claims, *(usage_row(a, at, cost="0.01") for a in accounts))
    # Unreviewed, a claim bills nothing yet (it blocks finalization): it does not exhaust
    # the month's budget.
    assert [_month_spend(fresh_database_url, a) for a in accounts] == [Decimal("0.01")] * 3

    async def review() -> None:
        engine = create_engine(fresh_database_url, pool_size=1)
        try:
            async with transaction(session_factory(engine)) as session:
                await flagged.accept(session, claims[1]["request_id"], None)
                await flagged.adjust(session, claims[2]["request_id"], Decimal("-4294.96"), None)
        finally:
            await engine.dispose()

    asyncio.run(review())
    # Accepted: as claimed. Corrected: as claimed plus the adjustment.
    assert [_month_spend(fresh_database_url, a) for a in accounts] == [
        Decimal("0.01"),
        Decimal("4294.98"),
        Decimal("0.02"),
    ]


def test_a_flagged_claim_is_settled_at_most_at_its_reservation() -> None:
    async def run() -> tuple[int, int]:
        store = MemoryCounters()

        async def no_limits(key_id: uuid.UUID, account_id: uuid.UUID) -> KeyLimits:
            raise AssertionError("settling reads no key's limits")

        limits = Limits(
            Settings(), cast(AsyncEngine, None), cast(PriceCache, None), store, no_limits
        )
        counter = "account:x:2025-03"
        await store.sync(counter, 0)
        held = Grant("r1", budget_counters=(counter,), reserved_nano=20_000_000)
        await store.admit([], [Hold(counter, 10**12, 20_000_000)], "r1", 60, 0)
        await limits.settle(held, 10, Decimal("4294.97"), flagged=True)
        plain = Grant("r2", budget_counters=(counter,), reserved_nano=20_000_000)
        await store.admit([], [Hold(counter, 10**12, 20_000_000)], "r2", 60, 0)
        await limits.settle(plain, 10, Decimal("0.01"))
        return await store.state(counter)

    spent, reserved = asyncio.run(run())
    # The flagged claim is charged what its reservation held ($0.02), the other its cost.
    assert (spent, reserved) == (30_000_000, 0)
