"""`python -m bench quotes`: latency of a history quote drawn from 100,000 past tasks.

On a database of the bench's own, one account gets `--tasks` completed tasks of one type
on one model (log-normal costs, spread over the 90-day look-back window; the rollup
trigger runs for each, as in production). Then `--quotes` quotes are made through the
production code (`service.quotes.service.create_quote`, each in its own transaction, as
`POST /billing/quotes` does) at varying confidences, and their latencies reported. For
comparison, the same quantile is computed by one `percentile_disc` over every task.

    python -m bench quotes [--tasks 100000] [--quotes 300]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from datetime import UTC, datetime
from decimal import Decimal

import asyncpg

from bench.support import bench_database
from pricing.prices import PriceBook
from service.auth.principal import ADMIN
from service.db.engine import asyncpg_dsn, create_engine, session_factory, transaction
from service.prices.cache import seed_default_prices
from service.prices.repository import PriceRepository
from service.quotes.schemas import QuoteCreate
from service.quotes.service import create_quote, history_start
from service.settings import Settings

MODEL = "meta-llama/Llama-3.3-70B-Instruct"
TARGET_MS = 50.0

SEED = """
INSERT INTO tasks (account_id, external_id, task_type, model, status, created_at,
                   completed_at, completed_cost_usd)
SELECT $1, 'past-' || i, 'summarize', $2, CASE WHEN i % 10 = 0 THEN 'failed' ELSE 'succeeded' END,
       now() - make_interval(secs => i::float8 / $3 * 7689600),
       now() - make_interval(secs => i::float8 / $3 * 7689600),
       round(exp(-4 + 0.8 * sqrt(-2 * ln(random())) * cos(2 * pi() * random()))::numeric, 9)
FROM generate_series(1, $3) AS i
"""

NAIVE = """
SELECT percentile_disc($5::float8) WITHIN GROUP (ORDER BY completed_cost_usd), count(*),
       avg(completed_cost_usd)
FROM tasks
WHERE account_id = $1 AND task_type = 'summarize' AND model = $2
  AND completed_cost_usd IS NOT NULL AND completed_at >= $3 AND $4::int IS NOT NULL
"""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(database_url: str, tasks: int, quotes: int) -> None:
    settings = Settings(database_url=database_url)
    connection = await asyncpg.connect(asyncpg_dsn(database_url))
    account_id = await connection.fetchval(
        "INSERT INTO accounts (name) VALUES ('bench') RETURNING id"
    )
    started = time.perf_counter()
    await connection.execute(SEED, account_id, MODEL, tasks)
    await connection.execute("VACUUM ANALYZE tasks")
    await connection.execute("VACUUM ANALYZE task_cost_rollup")
    seeded = time.perf_counter() - started
    rollup_rows = await connection.fetchval("SELECT count(*) FROM task_cost_rollup")
    print(f"seeded {tasks:,} completed tasks in {seeded:.1f}s ({rollup_rows:,} rollup rows)")

    engine = create_engine(database_url, pool_size=2)
    sessions = session_factory(engine)
    await seed_default_prices(sessions)
    async with sessions() as session:
        book = PriceBook(await PriceRepository(session).all_prices())

    confidences = [Decimal("0.9"), Decimal("0.5"), Decimal("0.95"), Decimal("0.99")]
    latencies: list[float] = []
    sample_size = 0
    for i in range(quotes):
        data = QuoteCreate(
            account_id=account_id,
            task_type="summarize",
            model=MODEL,
            confidence=confidences[i % len(confidences)],
        )
        t0 = time.perf_counter()
        async with transaction(sessions) as session:
            quote = await create_quote(session, settings, book, ADMIN, data)
        latencies.append((time.perf_counter() - t0) * 1000)
        assert quote.basis == "history"
        sample_size = quote.sample_size

    naive: list[float] = []
    since = history_start(datetime.now(UTC), settings.quote_lookback_days)
    for i in range(min(quotes, 20)):
        t0 = time.perf_counter()
        await connection.fetchrow(NAIVE, account_id, MODEL, since, i, 0.9)
        naive.append((time.perf_counter() - t0) * 1000)
    await connection.close()
    await engine.dispose()

    p50, p95, p99 = (percentile(latencies, q) for q in (0.5, 0.95, 0.99))
    print(f"history quotes: {quotes} from a sample of {sample_size:,} tasks")
    print(
        f"  latency ms: p50 {p50:.2f}  p95 {p95:.2f}  p99 {p99:.2f}  max {max(latencies):.2f}"
        f"  mean {statistics.fmean(latencies):.2f}"
    )
    print(f"  one percentile_disc over every task instead: p50 {percentile(naive, 0.5):.1f} ms")
    verdict = "PASS" if p95 <= TARGET_MS else "FAIL"
    print(f"target p95 <= {TARGET_MS:.0f} ms: {verdict}")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench quotes", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--quotes", type=int, default=300)
    args = parser.parse_args(argv)
    with bench_database() as url:
        asyncio.run(run(url, args.tasks, args.quotes))
