"""Rate-limit windows and budget counters, in the process and in Redis, under concurrency.

The stores are what makes limits hold across workers and replicas; these tests drive them
directly with many concurrent callers (several Redis connections stand in for several
processes). The proxy-level behaviour is in test_limits_proxy.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from pricing.cost import TokenUsage, usage_cost
from pricing.invoice import BillingPeriod
from pricing.prices import Price
from service.auth.key_cache import KeyLimits
from service.limits import estimate
from service.limits.budgets import Hold, HoldResult
from service.limits.counters import Counters, MemoryCounters
from service.limits.policy import (
    Limit,
    applied_limits,
    budget_error,
    duration,
    to_nano_down,
    to_nano_up,
)
from service.limits.ratelimit import Charge, WindowResult
from service.limits.redis_counters import RedisCounters
from service.proxy.sse import OutputCounter
from service.settings import Settings
from service.tokens import estimate as tokens
from tests.support import free_port

REDIS_URL = "redis://127.0.0.1:6379/0"


async def _redis_available() -> bool:
    client = Redis.from_url(REDIS_URL, socket_connect_timeout=0.5)
    try:
        return bool(await client.ping())
    except OSError:
        return False
    finally:
        await client.aclose()


@pytest.fixture
async def redis_prefix() -> AsyncIterator[str]:
    """A namespace of this test's own in the shared Redis, removed afterwards."""
    if not await _redis_available():
        pytest.skip("no Redis at 127.0.0.1:6379")
    prefix = f"meterline-test-{secrets.token_hex(6)}:"
    yield prefix
    client = Redis.from_url(REDIS_URL)
    try:
        keys = [k async for k in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


# Several clients, each with its own connection pool, play the part of several processes.
@pytest.fixture
async def redis_clients() -> AsyncIterator[list[Redis]]:
    clients = [Redis.from_url(REDIS_URL) for _ in range(4)]
    yield clients
    for client in clients:
        await client.aclose()


class Windows:
    """The rate-limit half of a `Counters`, as the tests below drive it."""

    def __init__(self, counters: Counters) -> None:
        self.counters = counters

    async def hit(self, charges: list[Charge], now: float) -> WindowResult:
        return (await self.counters.admit(charges, [], "r", 60, now)).window

    async def adjust(self, counter: str, window: int, delta: int) -> None:
        await self.counters.settle(window, [(counter, delta)], [], "r", 0)
        await self.counters.flush()


class Budgets:
    """The budget half of a `Counters`, on budgets whose spend was synced from the ledger
    (an empty one unless the test syncs more)."""

    def __init__(self, counters: Counters) -> None:
        self.counters = counters

    async def reserve(self, holds: list[Hold], reservation: str, ttl_s: float) -> HoldResult:
        for hold in holds:
            await self.counters.sync(hold.counter, 0)  # never lowers what was synced
        admitted = await self.counters.admit([], holds, reservation, ttl_s, time.time())
        return admitted.budget

    async def settle(self, budgets: list[str], reservation: str, cost: int) -> None:
        await self.counters.settle(0, [], budgets, reservation, cost)
        await self.counters.flush()

    async def sync(self, budget: str, ledger_spent: int) -> None:
        await self.counters.sync(budget, ledger_spent)

    async def state(self, budget: str) -> tuple[int, int]:
        return await self.counters.state(budget)


@pytest.fixture(params=["memory", "redis"])
def shared_counters(request: pytest.FixtureRequest) -> list[Counters]:
    """Counters seen by several callers: one in memory, or four Redis clients."""
    if request.param == "memory":
        return [MemoryCounters()]
    prefix = request.getfixturevalue("redis_prefix")
    clients = request.getfixturevalue("redis_clients")
    return [RedisCounters(client, prefix) for client in clients]


@pytest.fixture
def limiters(shared_counters: list[Counters]) -> list[Windows]:
    return [Windows(c) for c in shared_counters]


@pytest.fixture
def budget_stores(shared_counters: list[Counters]) -> list[Budgets]:
    return [Budgets(c) for c in shared_counters]


# A moment well inside a window, so a test never straddles two.
NOW = 1_800_000_000.0 + 5


async def test_exactly_the_limit_is_admitted_under_concurrency(
    limiters: list[Windows],
) -> None:
    charge = [Charge("account:a:requests", 60, 1)]
    results = await asyncio.gather(
        *(limiters[i % len(limiters)].hit(charge, NOW) for i in range(150))
    )
    allowed = [r for r in results if r.allowed]
    assert len(allowed) == 60
    assert sorted(r.counts[0] for r in allowed) == list(range(1, 61))
    assert all(r.refused == 0 and r.counts == (60,) for r in results if not r.allowed)


async def test_a_new_window_starts_from_zero(limiters: list[Windows]) -> None:
    limiter = limiters[0]
    charge = [Charge("account:b:requests", 2, 1)]
    assert (await limiter.hit(charge, NOW)).allowed
    assert (await limiter.hit(charge, NOW + 1)).allowed
    refused = await limiter.hit(charge, NOW + 2)
    assert not refused.allowed
    assert refused.reset_s == pytest.approx(55 - 2)
    assert (await limiter.hit(charge, NOW + 60)).allowed


async def test_a_request_refused_by_one_limit_counts_in_none(
    limiters: list[Windows],
) -> None:
    limiter = limiters[0]
    account = Charge("account:c:requests", 100, 1)
    key = Charge("key:c:requests", 1, 1)
    assert (await limiter.hit([account, key], NOW)).allowed
    refused = await limiter.hit([account, key], NOW)
    assert refused.refused == 1
    # The account's counter still says 1: the refused request used nothing up.
    after = await limiter.hit([account], NOW)
    assert after.counts == (2,)


async def test_token_windows_are_corrected_to_real_usage(limiters: list[Windows]) -> None:
    limiter = limiters[0]
    tokens = Charge("account:d:tokens", 1000, 800)
    first = await limiter.hit([tokens], NOW)
    assert first.allowed
    assert not (await limiter.hit([tokens], NOW)).allowed
    # The request used 100 tokens, not the 800 it could have: room for another.
    await limiter.adjust("account:d:tokens", first.window, 100 - 800)
    assert (await limiter.hit([tokens], NOW)).counts == (900,)


async def test_a_budget_that_fits_ten_admits_ten_of_a_hundred(
    budget_stores: list[Budgets],
) -> None:
    hold = [Hold("account:e:2026-07", limit=10_000, amount=1_000)]
    results = await asyncio.gather(
        *(
            budget_stores[i % len(budget_stores)].reserve(hold, f"r{i}", ttl_s=60)
            for i in range(100)
        )
    )
    admitted = [i for i, r in enumerate(results) if r.allowed]
    assert len(admitted) == 10
    store = budget_stores[0]
    assert await store.state("account:e:2026-07") == (0, 10_000)
    # Each costs 600 in the end: 4,000 is free again, enough for four more.
    for i in admitted:
        await store.settle(["account:e:2026-07"], f"r{i}", 600)
    assert await store.state("account:e:2026-07") == (6_000, 0)
    again = [await store.reserve(hold, f"s{i}", ttl_s=60) for i in range(10)]
    assert sum(r.allowed for r in again) == 4


async def test_an_exhausted_budget_refuses_even_a_free_request(
    budget_stores: list[Budgets],
) -> None:
    store = budget_stores[0]
    counter = "account:f:2026-07"
    await store.sync(counter, 5_000)
    refused = await store.reserve([Hold(counter, 5_000, 0)], "r", ttl_s=60)
    assert not refused.allowed
    assert (refused.spent, refused.reserved) == (5_000, 0)


async def test_both_budgets_are_charged_or_neither(budget_stores: list[Budgets]) -> None:
    store = budget_stores[0]
    account, key = "account:g:2026-07", "key:g:2026-07"
    holds = [Hold(account, 10_000, 3_000), Hold(key, 4_000, 3_000)]
    assert (await store.reserve(holds, "r1", ttl_s=60)).allowed
    refused = await store.reserve(holds, "r2", ttl_s=60)
    assert refused.refused == 1
    assert await store.state(account) == (0, 3_000)


async def test_ledger_sync_raises_spend_and_never_lowers_it(
    budget_stores: list[Budgets],
) -> None:
    store = budget_stores[0]
    counter = "account:h:2026-07"
    await store.sync(counter, 700)
    await store.sync(counter, 500)  # a lagging ledger cannot undo settled spend
    assert await store.state(counter) == (700, 0)
    await store.reserve([Hold(counter, 10_000, 100)], "r", ttl_s=60)
    await store.settle([counter], "r", 90)
    assert await store.state(counter) == (790, 0)


async def test_a_reservation_never_settled_expires(budget_stores: list[Budgets]) -> None:
    store = budget_stores[0]
    counter = "account:i:2026-07"
    assert (await store.reserve([Hold(counter, 1_000, 1_000)], "lost", ttl_s=0.05)).allowed
    assert not (await store.reserve([Hold(counter, 1_000, 1_000)], "next", ttl_s=60)).allowed
    await asyncio.sleep(0.1)
    assert (await store.reserve([Hold(counter, 1_000, 1_000)], "next", ttl_s=60)).allowed
    # A late settle of the expired reservation still counts its real cost.
    await store.settle([counter], "lost", 10)
    assert await store.state(counter) == (10, 1_000)


def test_tiers_and_overrides() -> None:
    settings = Settings(tier_basic_rpm=60, tier_pro_rpm=600, tier_pro_tpm=None)
    account, key = uuid.uuid4(), uuid.uuid4()
    basic = applied_limits(settings, KeyLimits(key, account, "basic"))
    assert [(lim.scope, lim.limit) for lim in basic.requests] == [("account", 60)]
    assert basic.tokens == () and basic.budgets == ()
    pro = applied_limits(settings, KeyLimits(key, account, "pro"))
    assert [lim.limit for lim in pro.requests] == [600]
    custom = applied_limits(
        settings,
        KeyLimits(
            key,
            account,
            "pro",
            account_rpm=5,
            account_tpm=1000,
            key_rpm=2,
            account_budget_usd=Decimal("1.5"),
            key_budget_usd=Decimal("0.25"),
        ),
    )
    assert [(lim.scope, lim.limit) for lim in custom.requests] == [("account", 5), ("key", 2)]
    assert [lim.limit for lim in custom.tokens] == [1000]
    assert [lim.limit for lim in custom.budgets] == [1_500_000_000, 250_000_000]
    assert applied_limits(settings, KeyLimits(key, account, "custom")).empty


def test_money_becomes_integer_nano_usd_rounded_the_safe_way() -> None:
    assert to_nano_up(Decimal("0.0000000001")) == 1  # a reservation never rounds to zero
    assert to_nano_up(Decimal("0.000012400000")) == 12_400
    assert to_nano_down(Decimal("10.0000000019")) == 10_000_000_001
    assert to_nano_up(Decimal("10.0000000011")) == 10_000_000_002


def test_budget_refusal_says_which_budget_and_when_it_resets() -> None:
    owner = uuid.uuid4()
    month = BillingPeriod.parse("2026-12")
    start, end = month.start, month.end
    assert (start, end) == (datetime(2026, 12, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC))
    error = budget_error(Limit("key", owner, 1_000_000_000), 999_000_000, 0, 5_000_000, end)
    assert error.status_code == 429
    assert error.body()["error"]["code"] == "insufficient_quota"
    assert error.body()["error"]["type"] == "insufficient_quota"
    assert f"monthly budget of key {owner} (1 USD)" in error.message
    assert "resets at 2027-01-01T00:00:00Z" in error.message
    assert int(error.headers["retry-after"]) > 0


def test_reset_durations_read_like_openais() -> None:
    assert duration(0.2) == "200ms"
    assert duration(12.3) == "13s"
    assert duration(60) == "1m0s"


def test_the_worst_case_of_a_request() -> None:
    chat = {
        "model": "m",
        "messages": [{"role": "user", "content": "hello world " * 50}],
        "max_tokens": 100,
        "n": 2,
    }
    prompt = tokens.prompt_tokens(chat)
    assert 100 <= prompt <= 110
    assert tokens.completion_tokens(chat, default=4096) == 200
    assert tokens.completion_tokens({"messages": []}, default=4096) == 4096
    assert tokens.completion_tokens({"input": "x"}, default=4096) == 0  # embeddings
    assert tokens.prompt_tokens({"prompt": [[1, 2, 3], "hello"]}) == 4
    # A huge prompt is extrapolated from a sample, still close to the real count.
    text = "the quick brown fox " * 50_000
    assert tokens.count_text(text) == pytest.approx(200_000, rel=0.05)


class _NoPrices:
    book = None


async def test_a_redis_outage_lets_requests_through() -> None:
    """Counters unreachable: admission fails open (the ledger still records everything)."""
    from typing import Any, cast

    from service.limits.service import Limits
    from service.metrics import registry

    dead = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.2)
    settings = Settings(tier_basic_rpm=1)
    key, account = uuid.uuid4(), uuid.uuid4()

    async def held(key_id: uuid.UUID, account_id: uuid.UUID) -> KeyLimits:
        return KeyLimits(key_id, account_id, "basic")  # as the key directory holds it

    limits = Limits(
        settings,
        cast(Any, None),  # no database: the key directory holds the key's limits
        cast(Any, _NoPrices()),
        RedisCounters(dead, "x:"),
        held,
    )
    failed = registry.LIMIT_ERRORS.labels("admit")._value.get()
    skipped = registry.LIMIT_ERRORS.labels("skipped")._value.get()
    for _ in range(3):  # far past the limit of 1, yet admitted
        grant = await limits.admit(key_id=key, account_id=account, model="m", body={})
        assert grant.headers == {}
    # One attempt failed; the next requests did not wait on Redis again.
    assert registry.LIMIT_ERRORS.labels("admit")._value.get() == failed + 1
    assert registry.LIMIT_ERRORS.labels("skipped")._value.get() == skipped + 2
    await dead.aclose()


async def test_a_redis_outage_refuses_budgeted_requests_rather_than_overspend() -> None:
    """Counters unreachable: a request under a budget is refused with 503 (retry), since
    admitted without a hold, a burst would spend the budget many times over; a request
    under rate limits only still passes."""
    from typing import cast

    from pricing.prices import PriceBook
    from pricing.rate_cards import Tariff
    from service.limits.policy import BudgetUnavailable
    from service.limits.service import Limits

    dead = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.2)
    budgeted, unbudgeted = uuid.uuid4(), uuid.uuid4()

    async def held(key_id: uuid.UUID, account_id: uuid.UUID) -> KeyLimits:
        budget = Decimal("0.26") if account_id == budgeted else None
        return KeyLimits(key_id, account_id, "basic", account_budget_usd=budget)

    class Prices:
        book = PriceBook(
            [Price("m", Decimal(1000), Decimal(1000), datetime(2020, 1, 1, tzinfo=UTC))]
        )
        tariff = Tariff(book)

    limits = Limits(
        Settings(tier_basic_rpm=1),
        cast(Any, None),
        cast(Any, Prices()),
        RedisCounters(dead, "x:"),
        held,
    )
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}
    for _ in range(2):  # the failing call, and one while the store is left alone
        with pytest.raises(BudgetUnavailable) as refused:
            await limits.admit(key_id=uuid.uuid4(), account_id=budgeted, model="m", body=body)
        assert refused.value.status_code == 503 and "Redis" in refused.value.message
        assert refused.value.headers["retry-after"]
        grant = await limits.admit(key_id=uuid.uuid4(), account_id=unbudgeted, model="m", body=body)
        assert grant.budget_counters == ()
    await dead.aclose()


async def test_a_request_refused_by_its_budget_uses_none_of_its_rate_limit(
    shared_counters: list[Counters],
) -> None:
    counters = shared_counters[0]
    window = [Charge("account:j:requests", 10, 1)]
    budget = [Hold("account:j:2026-07", limit=1_000, amount=600)]
    await counters.sync("account:j:2026-07", 0)
    assert (await counters.admit(window, budget, "r1", 60, NOW)).allowed
    refused = await counters.admit(window, budget, "r2", 60, NOW)
    assert refused.window.allowed and refused.budget.refused == 0
    after = await counters.admit(window, [], "r3", 60, NOW)
    assert after.window.counts == (2,)  # r1 and r3: the refused r2 counted nowhere
    assert await counters.state("account:j:2026-07") == (0, 600)


async def test_a_burst_larger_than_any_connection_pool_is_counted_exactly(
    redis_prefix: str,
) -> None:
    """A thousand admissions at once share pipelined round trips on a small pool: none fails
    (a failure would let the request through unlimited), exactly the limit passes."""
    from redis.asyncio import BlockingConnectionPool

    pool = BlockingConnectionPool.from_url(REDIS_URL, max_connections=4, timeout=5)
    client = Redis(connection_pool=pool)
    counters = RedisCounters(client, redis_prefix)
    charge = [Charge("account:k:requests", 700, 1)]
    try:
        results = await asyncio.gather(
            *(counters.admit(charge, [], f"r{i}", 60, NOW) for i in range(1000))
        )
    finally:
        await client.aclose(close_connection_pool=True)
    assert sum(r.allowed for r in results) == 700
    assert sorted(r.window.counts[0] for r in results if r.allowed) == list(range(1, 701))


# -- hard budgets ----------------------------------------------------------------------


def test_a_request_reserves_the_larger_of_its_two_completion_limits() -> None:
    """Providers differ on which of `max_tokens` and `max_completion_tokens` wins."""
    chat = {"messages": [{"role": "user", "content": "hi"}], "n": 2}
    both = {**chat, "max_tokens": 10_000, "max_completion_tokens": 1}
    assert tokens.completion_tokens(both, default=4096) == 20_000
    assert tokens.completion_limit(both) == 10_000
    assert tokens.completion_tokens({**chat, "max_completion_tokens": 300}, 4096) == 600
    assert tokens.completion_limit({**chat, "max_tokens": None}) is None
    # A text completion without a limit generates OpenAI's default of 16 tokens.
    assert tokens.completion_tokens({"prompt": "Once upon a time"}, default=4096) == 16


def test_every_text_the_provider_bills_counts_in_the_prompt() -> None:
    """Roles, names, content parts, tool calls, legacy function calls, tool and function
    definitions, forced tool choice and response schema are all rendered into the prompt."""
    long = "ledger " * 400  # 400 tokens
    plain = tokens.prompt_tokens({"messages": [{"role": "user", "content": "hi"}]})
    bodies: dict[str, dict[str, Any]] = {
        "role": {"messages": [{"role": long, "content": "hi"}]},
        "name": {"messages": [{"role": "user", "name": long, "content": "hi"}]},
        "content part": {
            "messages": [{"role": "user", "content": [{"type": "text", "text": long}]}]
        },
        "tool call": {
            "messages": [
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "f", "arguments": long},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "ok"},
            ]
        },
        "function call": {
            "messages": [{"role": "assistant", "function_call": {"name": "f", "arguments": long}}]
        },
        "tools": {
            "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"type": "function", "function": {"name": "f", "description": long}}],
        },
        "functions": {
            "messages": [{"role": "user", "content": "hi"}],
            "functions": [{"name": "f", "description": long}],
        },
        "response schema": {
            "messages": [{"role": "user", "content": "hi"}],
            "response_format": {"type": "json_schema", "json_schema": {"description": long}},
        },
    }
    for field, body in bodies.items():
        assert tokens.prompt_tokens(body) >= plain + 400, field
    # A media part counts as a bounded allowance, never as its (base64) data.
    image = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what is this?"},
                    {
                        "type": "image_url",
                        "image_url": {"url": "data:image/png;base64," + "A" * 500_000},
                    },
                ],
            }
        ]
    }
    assert 1_536 < tokens.prompt_tokens(image) < 1_600


@given(
    rate=st.decimals(min_value=0, max_value=1000, places=6),
    prompt=st.integers(min_value=0, max_value=1_000_000),
    extra=st.integers(min_value=0, max_value=10**12),
    n=st.integers(min_value=1, max_value=4),
)
@settings(max_examples=300, deadline=None)
def test_a_capped_completion_never_costs_more_than_was_granted(
    rate: Decimal, prompt: int, extra: int, n: int
) -> None:
    price = Price("m", rate, rate, datetime(2026, 1, 1, tzinfo=UTC))
    prompt_nano = math.ceil(prompt * estimate.nano_per_token(price)[0])
    assert prompt_nano == to_nano_up(usage_cost(TokenUsage(prompt, 0), price))
    granted = prompt_nano + extra
    per_choice = estimate.affordable_completion(price, prompt_nano, granted, n)
    assert to_nano_up(usage_cost(TokenUsage(prompt, per_choice * n), price)) <= granted
    if rate > 0:  # and one more token a choice would not have been paid for
        assert (per_choice + 1) * n * rate * 1000 > extra


async def test_an_unbounded_request_is_granted_what_is_left(budget_stores: list[Budgets]) -> None:
    """A request without a completion limit holds its default budget, or what is left of the
    budget when less (it is then capped to it); one with a limit must fit whole."""
    store = budget_stores[0]
    counter = "account:m:2026-07"
    unbounded = [Hold(counter, 10_000, amount=4_000, minimum=500)]
    granted = [(await store.reserve(unbounded, f"u{i}", ttl_s=60)).granted for i in range(3)]
    assert granted == [4_000, 4_000, 2_000]
    assert not (await store.reserve(unbounded, "u3", ttl_s=60)).allowed
    await store.settle([counter], "u2", 1_000)  # 1,000 of its 2,000 freed again
    assert not (await store.reserve([Hold(counter, 10_000, 4_000)], "b", ttl_s=60)).allowed
    assert (await store.reserve(unbounded, "u4", ttl_s=60)).granted == 1_000
    assert await store.state(counter) == (1_000, 9_000)


async def test_a_budget_never_synced_from_the_ledger_admits_nothing(
    shared_counters: list[Counters], request: pytest.FixtureRequest
) -> None:
    """A new process or month (or a Redis that came back empty) must not admit against a
    counter at 0: the budget says it is unsynced, and the refused request counts nowhere."""
    counters = shared_counters[0]
    window = [Charge("account:n:requests", 10, 1)]
    budget = "account:n:2026-07"
    hold = [Hold(budget, 10_000, 100)]
    refused = await counters.admit(window, hold, "r1", 60, NOW)
    assert not refused.allowed and refused.budget.unsynced and refused.budget.refused == 0
    await counters.sync(budget, 9_950)
    admitted = await counters.admit(window, hold, "r2", 60, NOW)
    assert not admitted.allowed and not admitted.budget.unsynced  # only 50 left
    assert (await counters.admit(window, [Hold(budget, 10_000, 50)], "r3", 60, NOW)).allowed
    assert (await counters.admit(window, [], "r4", 60, NOW)).window.counts == (2,)
    if isinstance(counters, RedisCounters):  # Redis restarted empty: unsynced again
        prefix = request.getfixturevalue("redis_prefix")
        client = Redis.from_url(REDIS_URL)
        try:
            await client.delete(*[k async for k in client.scan_iter(match=f"{prefix}*")])
        finally:
            await client.aclose()
        assert (await counters.admit(window, hold, "r5", 60, NOW)).budget.unsynced


@contextlib.asynccontextmanager
async def slow_link_to_redis(delay_s: float) -> AsyncIterator[int]:
    """A TCP relay to the test Redis that delays each of its answers: a slow network."""

    async def relay(source: asyncio.StreamReader, sink: asyncio.StreamWriter, delay: float) -> None:
        try:
            while data := await source.read(65536):
                await asyncio.sleep(delay)
                sink.write(data)
                await sink.drain()
        except ConnectionError:
            pass
        finally:
            sink.close()

    async def connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        redis_reader, redis_writer = await asyncio.open_connection("127.0.0.1", 6379)
        await asyncio.gather(relay(reader, redis_writer, 0), relay(redis_reader, writer, delay_s))

    server = await asyncio.start_server(connect, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def test_a_settlement_made_while_a_batch_is_on_its_way_is_sent_promptly(
    redis_prefix: str,
) -> None:
    """A settlement arriving while the previous batch waits for Redis must not wait (holding
    its reservation) until some later request settles too."""
    async with slow_link_to_redis(0.3) as port:
        client = Redis(host="127.0.0.1", port=port)
        counters = RedisCounters(client, redis_prefix)
        budget = "account:o:2026-07"
        try:
            await counters.sync(budget, 0)
            for rid in ("r1", "r2"):
                hold = [Hold(budget, 10_000, 1_000)]
                assert (await counters.admit([], hold, rid, 60, time.time())).allowed
            await counters.settle(0, [], [budget], "r1", 100)
            await asyncio.sleep(0.1)  # r1's batch is sent, its answer 0.2 s away
            await counters.settle(0, [], [budget], "r2", 100)
            await asyncio.sleep(1.5)  # no other request settles meanwhile
            direct = Redis.from_url(REDIS_URL)
            try:
                base = f"{redis_prefix}budget:{budget}"
                values = await direct.mget(f"{base}:spent", f"{base}:reserved")
            finally:
                await direct.aclose()
            assert [int(v or 0) for v in values] == [200, 0]
        finally:
            await counters.close()
            await client.aclose()


def _sse(*events: dict[str, Any] | str) -> list[bytes]:
    return [
        b"data: " + (e.encode() if isinstance(e, str) else orjson.dumps(e)) + b"\n\n"
        for e in events
    ]


def _delta(content: str, **more: Any) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}], **more}


def _passed_on(counter: OutputCounter, stream: bytes, piece: int) -> tuple[bytes, bool]:
    """What the proxy passes on when the stream arrives in pieces of `piece` bytes."""
    out = b""
    for start in range(0, len(stream), piece):
        chunk = stream[start : start + piece]
        keep = counter.feed(chunk)
        out += chunk if keep is None else chunk[:keep]
        if keep is not None:
            return out, True
    return out, False


def test_a_stream_is_cut_at_the_first_chunk_past_its_allowance() -> None:
    role = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
    words = [_delta(f" w{i}") for i in range(10)]
    stream = _sse(role, *words, "[DONE]")
    within = b"".join(stream[:4])  # the role chunk and three words
    # Whole events per piece, or pieces cutting events anywhere: never more than one chunk.
    assert _passed_on(OutputCounter(3), b"".join(stream), 10_000) == (within, True)
    for size in (1, 7, 50):
        out, cut = _passed_on(OutputCounter(3), b"".join(stream), size)
        assert cut and out in (within, b"".join(stream[:5]))
    counter, out = OutputCounter(3), b""  # one event a piece, as providers mostly send
    for event in stream:
        keep = counter.feed(event)
        out += event[: len(event) if keep is None else keep]
        if keep is not None:
            break
    assert out == within
    # A stream within its allowance (the provider honoured max_tokens) is never cut.
    honoured = _sse(role, *words[:3], {"choices": [], "usage": {"completion_tokens": 3}}, "[DONE]")
    assert _passed_on(OutputCounter(3), b"".join(honoured), 100) == (b"".join(honoured), False)
    # A provider's running usage counts when it says more than the chunks do.
    running = _sse(_delta(" many", usage={"completion_tokens": 40}), *words)
    assert _passed_on(OutputCounter(30), b"".join(running), 10_000) == (b"", True)


_TEXT = st.text(st.characters(codec="utf-8"), max_size=40)
_MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool"]), "content": _TEXT},
    optional={
        "name": _TEXT,
        "tool_calls": st.lists(
            st.fixed_dictionaries(
                {
                    "id": _TEXT,
                    "type": st.just("function"),
                    "function": st.fixed_dictionaries({"name": _TEXT, "arguments": _TEXT}),
                }
            ),
            max_size=2,
        ),
    },
)


@settings(max_examples=200, deadline=None)
@given(messages=st.lists(_MESSAGE, min_size=1, max_size=6))
def test_a_chat_reserves_at_least_the_prompt_its_usage_would_be_estimated_at(
    messages: list[dict[str, Any]],
) -> None:
    """One module, two questions: the usage estimate is the best guess of what the provider
    counted (the prompt as the model reads it), the reservation a bound on what it may bill
    (every text field, plus each message's markers). The bound is never below the guess,
    so a request is never recorded above what it was allowed to reserve for its prompt."""
    body = {"model": "m", "messages": messages}
    assert tokens.prompt_tokens(body) >= tokens.count_tokens(tokens.prompt_text(body))
