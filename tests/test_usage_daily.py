"""The daily usage rollup: a report over whole UTC days reads `usage_daily` plus the ledger
rows recorded since its watermark, and must give exactly the ledger's own totals, before a
fold, after it, and with rows arriving between folds; nothing counted twice or missed."""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, TypeVar

from service.db.engine import create_engine, session_factory, transaction
from service.usage.cache import BreakdownCache
from service.usage.repository import UsageFilter
from service.usage.rollup import roll_up_daily
from service.usage.schemas import GroupBy
from service.usage.service import usage_breakdowns, usage_report
from tests.support import Database
from tests.usage_rows import insert_usage, usage_row

T = TypeVar("T")
START = datetime(2025, 6, 1, tzinfo=UTC)
END = datetime(2025, 7, 1, tzinfo=UTC)
GROUPINGS: list[list[GroupBy]] = [
    [],
    ["day"],
    ["model"],
    ["key"],
    ["account"],
    ["status"],
    ["provider", "task_type"],
    ["day", "status", "model"],
    ["month", "key"],
]


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coroutine)


async def _report(url: str, where: UsageFilter, group_by: list[GroupBy]) -> list[dict[str, Any]]:
    engine = create_engine(url, pool_size=1)
    try:
        async with session_factory(engine)() as session:
            report = await usage_report(session, where, group_by, 10_000)
        return [row.model_dump(exclude_unset=True) for row in report.data]
    finally:
        await engine.dispose()


async def _fold(url: str) -> int | None:
    engine = create_engine(url, pool_size=1)
    try:
        async with transaction(session_factory(engine)) as session:
            return await roll_up_daily(session, wait=True)
    finally:
        await engine.dispose()


FIELDS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "day": lambda r: r["occurred_at"].date(),
    "month": lambda r: f"{r['occurred_at']:%Y-%m}",
    "account": lambda r: r["account_id"],
    "model": lambda r: r["requested_model"],
    "key": lambda r: r["key_id"],
    "task_type": lambda r: r["task_type"],
    "provider": lambda r: r["provider"],
    "status": lambda r: r["status_code"],
}
NAMES = {"account": "account_id", "key": "key_id", "status": "status_code"}


def expected(rows: Sequence[dict[str, Any]], group_by: list[GroupBy]) -> list[dict[str, Any]]:
    """The report computed by hand from the rows, in the API's shape and order."""
    sums: dict[tuple[Any, ...], dict[str, Any]] = defaultdict(
        lambda: {
            "requests": 0,
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "total_tokens": 0,
            "cached_tokens": 0,
            "reasoning_tokens": 0,
            "cost_usd": Decimal(0),
            "unpriced_requests": 0,
        }
    )
    for r in rows:
        s = sums[tuple(FIELDS[g](r) for g in group_by)]
        s["requests"] += 1
        for name in ("prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens"):
            s[name] += r[name]
        s["reasoning_tokens"] += r["reasoning_tokens"]
        if r["cost_usd"] is None:
            s["unpriced_requests"] += 1
        else:
            s["cost_usd"] += r["cost_usd"]
    if not group_by and not sums:
        sums[()]  # one row of zeros
    out = []
    for key in sorted(sums, key=lambda k: tuple((v is None, v) for v in k)):
        out.append(
            {**{NAMES.get(g, g): v for g, v in zip(group_by, key, strict=True)}, **sums[key]}
        )
    return out


def _rows(account: uuid.UUID, other: uuid.UUID, key: uuid.UUID, first: int) -> list[dict[str, Any]]:
    day = START + timedelta(days=first)
    return [
        usage_row(account, day + timedelta(hours=1), key_id=key, model="m-a", cost="0.000150"),
        usage_row(account, day + timedelta(hours=23, minutes=59), key_id=key, model="m-b"),
        # Unpriced, failed, estimated by another provider, in a task type.
        usage_row(account, day + timedelta(days=1), key_id=key, model="m-a", cost=None),
        usage_row(account, day + timedelta(days=1), model="m-a", status=502, provider=None),
        usage_row(
            other,
            day + timedelta(days=2),
            model="m-c",
            task_type="summarize",
            cached=4,
            reasoning=2,
        ),
        # A correction row: no key, a negative exact cost.
        usage_row(account, day + timedelta(days=2), kind="adjustment", cost="-0.000010000001"),
        # The last instant of the month, and the first of the next (outside the range).
        usage_row(account, END - timedelta(microseconds=1), key_id=key, model="m-a"),
        usage_row(account, END, key_id=key, model="m-a"),
    ]


async def _breakdowns(
    url: str, where: UsageFilter, held: BreakdownCache | None
) -> list[list[dict[str, Any]]]:
    engine = create_engine(url, pool_size=1)
    try:
        async with session_factory(engine)() as session:
            found = await usage_breakdowns(session, where, [g for g in GROUPINGS if g], held)
        return [[row.model_dump(exclude_unset=True) for row in rows] for rows in found]
    finally:
        await engine.dispose()


# Held across a test's folds: an entry read before a fold, with the tail read beside it,
# must stay exact after it. One is never replaced; the other is replaced as soon as its
# tail holds a row the rollup has folded since.
HELD: list[BreakdownCache] = []


def _reports(url: str, where: UsageFilter) -> list[list[dict[str, Any]]]:
    reports = [run(_report(url, where, g)) for g in GROUPINGS]
    # The dashboard's one-pass breakdowns give the same groups (in no particular order),
    # read afresh or beside a rollup held from before.
    for held in (None, *HELD):
        together = run(_breakdowns(url, where, held))
        for alone, grouping, rows in zip(reports[1:], GROUPINGS[1:], together, strict=True):
            assert sorted(map(repr, rows)) == sorted(map(repr, alone)), (grouping, held)
    return reports


def _expected(rows: list[dict[str, Any]], where: UsageFilter) -> list[list[dict[str, Any]]]:
    chosen = [
        r
        for r in rows
        if (where.start is None or r["occurred_at"] >= where.start)
        and (where.end is None or r["occurred_at"] < where.end)
        and (where.account_id is None or r["account_id"] == where.account_id)
        and (where.key_id is None or r["key_id"] == where.key_id)
        and (where.model is None or r["requested_model"] == where.model)
    ]
    return [expected(chosen, g) for g in GROUPINGS]


def test_reports_over_whole_days_match_the_ledger_before_and_after_each_fold(
    fresh_database_url: str,
) -> None:
    url = fresh_database_url
    HELD[:] = [BreakdownCache(tail_rows=10**9), BreakdownCache(tail_rows=0)]
    db = Database(url)
    account, other, key = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    first = _rows(account, other, key, 0)
    insert_usage(db, *first)
    filters = [
        UsageFilter(start=START, end=END),
        UsageFilter(account_id=account, start=START, end=END),
        UsageFilter(account_id=account, key_id=key, model="m-a", start=START),
        UsageFilter(),
    ]
    for where in filters:  # nothing folded yet: all from the ledger's tail
        assert _reports(url, where) == _expected(first, where)

    assert run(_fold(url)) == len(first)
    for where in filters:  # all from the rollup
        assert _reports(url, where) == _expected(first, where)
    assert run(_fold(url)) == 0  # nothing new: folding again adds nothing

    second = _rows(account, other, key, 5)  # recorded after the watermark: rollup + tail
    insert_usage(db, *second)
    for where in filters:
        assert _reports(url, where) == _expected(first + second, where)
    assert run(_fold(url)) == len(second)
    for where in filters:
        assert _reports(url, where) == _expected(first + second, where)
    # One entry per filter in the cache that keeps its entries: they were read beside.
    assert len(HELD[0]) == len(filters)


def test_a_range_not_on_day_boundaries_is_read_from_the_ledger(fresh_database_url: str) -> None:
    url = fresh_database_url
    account, other, key = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    rows = _rows(account, other, key, 0)
    insert_usage(Database(url), *rows)
    assert run(_fold(url)) == len(rows)
    # Noon to noon: the rollup cannot split its days, so the ledger answers.
    where = UsageFilter(start=START + timedelta(hours=12), end=START + timedelta(days=2, hours=12))
    assert _reports(url, where) == _expected(rows, where)
