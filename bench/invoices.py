"""`python -m bench invoices`: every account's invoice for a month of 5,000,000 ledger rows.

Creates a database of its own on `METERLINE_DATABASE_URL` (default
postgresql://postgres@127.0.0.1:5432/test), migrates it, loads Hyperbolic's price list,
and COPYs (asyncpg `copy_records_to_table`) one past month of ledger rows spread over
`--accounts` accounts and the list's models, priced as the proxy prices them; a share of
the rows has no price (a model missing from the list, priced on the draft by a version
added afterwards), and a share belongs to quoted tasks (billed at their fixed price, not
their tokens). Then it times generating every account's draft for the month, the bulk path
of `meterline invoices generate --period P`, in one transaction:

1. from the ledger alone (the usage rollup still empty): one pass over the month;
2. after the server's background job has rolled the ledger up (timed too: it must keep up
   with ingest), with `--tail-rows` more rows recorded since, as in steady operation,
   `--runs` times (refreshing the drafts).

Each run checks that the invoices hold exactly the ledger's cost. Target: ≤ 10 s.

    python -m bench invoices [--rows 5000000] [--accounts 1000] [--runs 3]
                             [--tail-rows 50000] [--unpriced-share 0.001] [--task-share 0.01]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
from sqlalchemy import text

from bench.support import bench_database
from pricing.cost import TokenUsage, usage_cost
from pricing.invoice import BillingPeriod
from pricing.prices import Price
from service.db.engine import asyncpg_dsn, create_engine, session_factory, transaction
from service.invoices import service
from service.invoices.rollup import RollUp, roll_up
from service.prices.cache import seed_default_prices
from service.prices.repository import PriceRepository

TARGET_S = 10.0
TASKS_PER_ACCOUNT = 5
CHUNK = 100_000
UNLISTED = "custom/unlisted-model"
COLUMNS = (
    "request_id",
    "occurred_at",
    "recorded_at",
    "account_id",
    "task_id",
    "task_type",
    "endpoint",
    "requested_model",
    "stream",
    "status_code",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "usage_source",
    "cost_usd",
    "price_version_id",
    # The provider's cost and the versions used, as the proxy writes them.
    "provider_cost_usd",
    "provider_cost_version_id",
    "rate_card_version_id",
)


Shape = tuple[str, int, int, Decimal, int, Decimal]


def _shapes(prices: list[Price], rnd: random.Random) -> list[Shape]:
    """A few hundred (model, prompt, completion, cost, version, provider cost) shapes; rows
    pick among them, so 5M rows do not need 5M Decimal computations. The provider cost is
    60 % of the list price's rates."""
    shapes = []
    for _ in range(400):
        price = rnd.choice(prices)
        prompt, completion = rnd.randint(50, 8000), rnd.randint(1, 2000)
        cost = usage_cost(TokenUsage(prompt, completion), price)
        provider = cost * Decimal("0.6")
        assert price.version_id is not None
        shapes.append((price.model, prompt, completion, cost, price.version_id, provider))
    return shapes


def _records(
    rnd: random.Random,
    shapes: list[Shape],
    accounts: list[uuid.UUID],
    period: BillingPeriod,
    first: int,
    count: int,
    args: argparse.Namespace,
    recorded: bool,
) -> list[tuple[object, ...]]:
    """`count` ledger rows from row number `first`, spread evenly over the month. With
    `recorded`, `recorded_at` is set as if each row had been written as it occurred (the
    seed); without, the database stamps it now, as it does every real insert."""
    span = (period.end - period.start).total_seconds() - 1
    records: list[tuple[object, ...]] = []
    for i in range(first, first + count):
        model, prompt, completion, stored, listed, upstream = shapes[rnd.randrange(len(shapes))]
        cost: Decimal | None = stored
        version: int | None = listed
        # Half the accounts on a rate card (version 1), every row with a provider cost.
        provider_cost: Decimal | None = upstream
        task = None
        draw = rnd.random()
        if draw < args.unpriced_share:
            model, cost, version, provider_cost = UNLISTED, None, None, None
        elif draw < args.unpriced_share + args.task_share:
            task = f"task-{rnd.randrange(TASKS_PER_ACCOUNT)}"
        occurred = period.start + timedelta(seconds=span * (i % args.rows) / args.rows)
        account = rnd.randrange(len(accounts))
        row: tuple[object, ...] = (
            f"bench-{i:012d}",
            occurred,
            accounts[account],
            task,
            "summarize" if task else None,
            "chat",
            model,
            False,
            200,
            prompt,
            completion,
            prompt + completion,
            "upstream",
            cost,
            version,
            provider_cost,
            None if provider_cost is None else 1,
            1 if account % 2 else None,
        )
        records.append((*row[:2], occurred + timedelta(seconds=2), *row[2:]) if recorded else row)
    return records


async def _seed(url: str, args: argparse.Namespace, period: BillingPeriod) -> float:
    engine = create_engine(url, pool_size=2)
    await seed_default_prices(session_factory(engine))
    async with transaction(session_factory(engine)) as session:
        prices = [p for p in await PriceRepository(session).all_prices() if not p.is_pattern]
    await engine.dispose()

    rnd = random.Random(42)
    connection = await asyncpg.connect(asyncpg_dsn(url))
    try:
        accounts = [uuid.uuid4() for _ in range(args.accounts)]
        await connection.copy_records_to_table(
            "accounts",
            records=[
                (a, f"bench-{i}", period.start - timedelta(days=30)) for i, a in enumerate(accounts)
            ],
            columns=("id", "name", "created_at"),
        )
        await connection.execute("SELECT meterline_ensure_usage_partition($1)", period.start)
        # Quoted tasks: a few per account, all succeeded in the month at a fixed price.
        quote_rows, task_rows = [], []
        for account in accounts:
            for k in range(TASKS_PER_ACCOUNT):
                quote = uuid.uuid4()
                quote_rows.append(
                    (
                        quote,
                        account,
                        "summarize",
                        prices[0].model,
                        "estimate",
                        0,
                        Decimal("0.9"),
                        Decimal("0.2"),
                        Decimal("0.01"),
                        Decimal("0.01"),
                        Decimal("0.25"),
                        period.end,
                        period.start,
                    )
                )
                task_rows.append(
                    (
                        account,
                        f"task-{k}",
                        "summarize",
                        prices[0].model,
                        quote,
                        Decimal("0.25"),
                        "succeeded",
                        period.start + timedelta(days=10 + k),
                        period.start,  # accepted as the month began: covers its requests
                        "fixed_price",
                    )
                )
        await connection.copy_records_to_table(
            "quotes",
            records=quote_rows,
            columns=(
                "id",
                "account_id",
                "task_type",
                "model",
                "basis",
                "sample_size",
                "confidence",
                "margin",
                "expected_cost_usd",
                "quantile_cost_usd",
                "price_usd",
                "valid_until",
                "created_at",
            ),
        )
        await connection.copy_records_to_table(
            "tasks",
            records=task_rows,
            columns=(
                "account_id",
                "external_id",
                "task_type",
                "model",
                "quote_id",
                "fixed_price_usd",
                "status",
                "completed_at",
                "created_at",
                "billed_as",
            ),
        )

        shapes = _shapes(prices, rnd)
        started = time.perf_counter()
        for first in range(0, args.rows, CHUNK):
            count = min(CHUNK, args.rows - first)
            records = _records(rnd, shapes, accounts, period, first, count, args, recorded=True)
            await connection.copy_records_to_table("usage_ledger", records=records, columns=COLUMNS)
            print(f"  seeded {min(first + CHUNK, args.rows):,} rows", end="\r", flush=True)
        seeded = time.perf_counter() - started
        # A price for the unlisted model, added after its rows were written: drafts price
        # those rows by it (phase 2 of the invoice query).
        await connection.execute(
            "INSERT INTO price_versions (model, input_usd_per_mtok, output_usd_per_mtok,"
            " effective_from) VALUES ($1, 1.1, 2.2, $2)",
            UNLISTED,
            period.start - timedelta(days=365),
        )
        print(f"\n  COPY: {args.rows:,} rows in {seeded:.1f} s ({args.rows / seeded:,.0f} rows/s)")
        started = time.perf_counter()
        await connection.execute("VACUUM ANALYZE usage_ledger")
        await connection.execute("ANALYZE tasks")
        print(f"  VACUUM ANALYZE: {time.perf_counter() - started:.1f} s")
    finally:
        await connection.close()
    return seeded


async def _expected_total(url: str, period: BillingPeriod) -> Decimal:
    """The month's exact bill computed independently: stored costs, unpriced rows at the
    price added later, quoted tasks at their fixed price instead of their tokens."""
    connection = await asyncpg.connect(asyncpg_dsn(url))
    try:
        tokens: Decimal = await connection.fetchval(
            "SELECT coalesce(sum(coalesce(u.cost_usd,"
            " (u.prompt_tokens * 1.1 + u.completion_tokens * 2.2) / 1000000)), 0)"
            " FROM usage_ledger u WHERE u.occurred_at >= $1 AND u.occurred_at < $2"
            " AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.account_id = u.account_id"
            " AND t.external_id = u.task_id AND t.quote_id IS NOT NULL"
            " AND u.occurred_at >= t.created_at)",
            period.start,
            period.end,
        )
        fixed: Decimal = await connection.fetchval(
            "SELECT coalesce(sum(fixed_price_usd), 0) FROM tasks WHERE status = 'succeeded'"
            " AND quote_id IS NOT NULL AND completed_at >= $1 AND completed_at < $2",
            period.start,
            period.end,
        )
        return tokens + fixed
    finally:
        await connection.close()


async def _generate(url: str, period: BillingPeriod) -> tuple[float, int, Decimal]:
    engine = create_engine(url, pool_size=2)
    try:
        started = time.perf_counter()
        async with transaction(session_factory(engine)) as session:
            result = await service.generate(session, period)
        elapsed = time.perf_counter() - started
        async with transaction(session_factory(engine)) as session:
            exact = (
                await session.execute(
                    text(
                        "SELECT coalesce(sum(l.amount_exact_usd), 0) FROM invoice_lines l"
                        " JOIN invoices i ON i.id = l.invoice_id WHERE i.period = :p"
                    ),
                    {"p": str(period)},
                )
            ).scalar_one()
        return elapsed, len(result.invoice_ids), exact
    finally:
        await engine.dispose()


async def _roll_up(url: str) -> RollUp:
    engine = create_engine(url, pool_size=1)
    try:
        async with transaction(session_factory(engine)) as session:
            done = await roll_up(session)
        assert done is not None
        return done
    finally:
        await engine.dispose()


async def _tail(url: str, args: argparse.Namespace, period: BillingPeriod) -> None:
    """Rows arriving after the roll-up, stamped by the database as they are inserted."""
    connection = await asyncpg.connect(asyncpg_dsn(url))
    try:
        accounts = [r[0] for r in await connection.fetch("SELECT id FROM accounts")]
        rnd = random.Random(7)
        engine = create_engine(url, pool_size=1)
        async with transaction(session_factory(engine)) as session:
            prices = [p for p in await PriceRepository(session).all_prices() if not p.is_pattern]
        await engine.dispose()
        shapes = _shapes([p for p in prices if p.model != UNLISTED], rnd)
        records = _records(
            rnd, shapes, accounts, period, args.rows, args.tail_rows, args, recorded=False
        )
        columns = tuple(c for c in COLUMNS if c != "recorded_at")
        await connection.copy_records_to_table("usage_ledger", records=records, columns=columns)
    finally:
        await connection.close()


def _report(label: str, elapsed: float, invoices: int, exact: Decimal, expected: Decimal) -> None:
    verdict = "ok" if elapsed <= TARGET_S else "ABOVE TARGET"
    check = "exact" if exact == expected else f"MISMATCH (expected {expected})"
    print(
        f"{label}: {invoices:,} invoices in {elapsed:.2f} s — target ≤ {TARGET_S:.0f} s:"
        f" {verdict}; lines sum ${exact}: {check}"
    )


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench invoices", description=__doc__)
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--accounts", type=int, default=1_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--unpriced-share", type=float, default=0.001)
    parser.add_argument("--task-share", type=float, default=0.01)
    parser.add_argument(
        "--tail-rows", type=int, default=50_000, help="Rows arriving after the roll-up."
    )
    args = parser.parse_args(argv)
    # A closed month: the one before last, so nothing of it can still be arriving.
    period = BillingPeriod.of(datetime.now(UTC)).previous().previous()

    with bench_database() as url:
        print(f"seeding {args.rows:,} ledger rows over {args.accounts:,} accounts, {period}")
        asyncio.run(_seed(url, args, period))
        expected = asyncio.run(_expected_total(url, period))

        # Without the rollup: one pass over the month's partition.
        elapsed, invoices, exact = asyncio.run(_generate(url, period))
        _report(f"ledger only ({args.rows:,} rows)", elapsed, invoices, exact, expected)

        # The server's background job, once over everything (then every minute over the new).
        done = asyncio.run(_roll_up(url))
        print(
            f"roll-up (background): {done.rows:,} rows in {done.seconds:.2f} s"
            f" ({done.rows / max(done.seconds, 1e-9):,.0f} rows/s)"
        )
        asyncio.run(_tail(url, args, period))
        expected = asyncio.run(_expected_total(url, period))
        for run in range(1, args.runs + 1):
            elapsed, invoices, exact = asyncio.run(_generate(url, period))
            label = f"run {run}, rollup + {args.tail_rows:,} rows recorded since"
            _report(label, elapsed, invoices, exact, expected)
