"""Rate-limit windows and budget counters, in the process and in Redis, under concurrency.

The stores are what makes limits hold across workers and replicas; these tests drive them
directly with many concurrent callers (several Redis connections stand in for several
processes). The proxy-level behaviour is in test_limits_proxy.py.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from redis.asyncio import Redis

from service.limits import estimate
from service.limits.budgets import Hold, HoldResult
from service.limits.counters import Counters, MemoryCounters, RedisCounters
from service.limits.policy import (
    KeyLimits,
    Limit,
    applied_limits,
    budget_error,
    duration,
    month_bounds,
    to_nano_down,
    to_nano_up,
)
from service.limits.ratelimit import Charge, WindowResult
from service.settings import Settings
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
    start, end = month_bounds("2026-12")
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
    prompt = estimate.prompt_tokens(chat)
    assert 100 <= prompt <= 110
    assert estimate.completion_tokens(chat, default=4096) == 200
    assert estimate.completion_tokens({"messages": []}, default=4096) == 4096
    assert estimate.completion_tokens({"input": "x"}, default=4096) == 0  # embeddings
    assert estimate.prompt_tokens({"prompt": [[1, 2, 3], "hello"]}) == 4
    # A huge prompt is extrapolated from a sample, still close to the real count.
    text = "the quick brown fox " * 50_000
    assert estimate.count_text(text) == pytest.approx(200_000, rel=0.05)


class _NoPrices:
    book = None


async def test_a_redis_outage_lets_requests_through() -> None:
    """Counters unreachable: admission fails open (the ledger still records everything)."""
    from typing import Any, cast

    from service.limits.service import Limits
    from service.metrics import registry

    dead = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.2)
    settings = Settings(tier_basic_rpm=1)
    limits = Limits(
        settings,
        cast(Any, None),  # no database: the limits below are already cached
        cast(Any, _NoPrices()),
        RedisCounters(dead, "x:"),
    )
    key, account = uuid.uuid4(), uuid.uuid4()
    limits.cache._by_key[key] = KeyLimits(key, account, "basic")
    failed = registry.LIMIT_ERRORS.labels("admit")._value.get()
    skipped = registry.LIMIT_ERRORS.labels("skipped")._value.get()
    for _ in range(3):  # far past the limit of 1, yet admitted
        grant = await limits.admit(key_id=key, account_id=account, model="m", body={})
        assert grant.headers == {}
    # One attempt failed; the next requests did not wait on Redis again.
    assert registry.LIMIT_ERRORS.labels("admit")._value.get() == failed + 1
    assert registry.LIMIT_ERRORS.labels("skipped")._value.get() == skipped + 2
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
