"""`python -m bench ingest`: ledger rows/s into Postgres through the ledger writer.

Records as the proxy makes them are submitted to a `LedgerWriter` (the production code:
batches of `--batch` rows, one `INSERT … SELECT FROM unnest(…) ON CONFLICT DO NOTHING`
each) on a database of the bench's own, and the time until the last row is committed is
measured. Then the same records are replayed (all conflicts), which must insert nothing.

    python -m bench ingest [--rows 300000] [--batch 1000 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import asyncpg

from bench.support import bench_database
from service.db.engine import asyncpg_dsn
from service.ledger.record import LedgerRecord, new_request_id
from service.ledger.writer import LedgerWriter


def records(n: int) -> list[LedgerRecord]:
    accounts = [uuid.uuid4() for _ in range(100)]
    keys = [uuid.uuid4() for _ in range(300)]
    now = datetime.now(UTC)
    return [
        LedgerRecord(
            request_id=new_request_id(),
            occurred_at=now,
            account_id=accounts[i % 100],
            key_id=keys[i % 300],
            task_id=f"task-{i // 7}" if i % 3 else None,
            task_type="summarize" if i % 3 else None,
            endpoint="chat",
            requested_model="meta-llama/Llama-3.3-70B-Instruct",
            upstream_model="meta-llama/Llama-3.3-70B-Instruct",
            provider="hyperbolic",
            stream=bool(i % 2),
            status_code=200,
            error_code=None,
            prompt_tokens=100 + i % 50,
            completion_tokens=200 + i % 70,
            total_tokens=300 + i % 50 + i % 70,
            cached_tokens=0,
            reasoning_tokens=0,
            usage_source="upstream",
            latency_ms=120,
            ttft_ms=15,
            cost_usd=Decimal("0.000120000000") + Decimal(i % 50) / 10**9,
            price_version_id=1,
            # The two figures of a row on a rate card, as the proxy writes them.
            provider_cost_usd=Decimal("0.000072000000") + Decimal(i % 50) / 10**9,
            provider_cost_version_id=1,
            rate_card_version_id=1,
        )
        for i in range(n)
    ]


async def ingest(
    dsn: str, batch: list[LedgerRecord], batch_size: int, spool: Path
) -> tuple[float, float]:
    """(seconds from the first submit to the last commit, of which submitting: journaling)."""
    # The whole load is queued at once: let the queue hold it (no spill to the spool).
    writer = LedgerWriter(
        dsn, spool, batch_size=batch_size, flush_interval_s=0.05, queue_max=len(batch) + 1
    )
    await writer.start()
    started = time.perf_counter()
    for record in batch:
        writer.submit(record)
    submitted = time.perf_counter() - started
    while writer.records_written + writer.records_spooled < len(batch):
        await asyncio.sleep(0.01)
    elapsed = time.perf_counter() - started
    await writer.close()
    if writer.records_spooled:
        raise SystemExit(f"{writer.records_spooled} rows were spooled: the database failed")
    return elapsed, submitted


async def count(dsn: str) -> int:
    connection = await asyncpg.connect(dsn)
    try:
        value: int = await connection.fetchval("SELECT count(*) FROM usage_ledger")
        return value
    finally:
        await connection.close()


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench ingest")
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--batch", type=int, nargs="+", default=[1000, 5000])
    args = parser.parse_args(argv)
    spool = Path(tempfile.mkdtemp(prefix="meterline-ingest-"))
    with bench_database() as url:
        dsn = asyncpg_dsn(url)
        for size in args.batch:
            made = records(args.rows)
            elapsed, submitted = asyncio.run(ingest(dsn, made, size, spool))
            print(
                f"batch {size:>6}: {args.rows} rows in {elapsed:.2f} s = "
                f"{args.rows / elapsed:,.0f} rows/s end to end (submitting, i.e. journaling "
                f"every record, took {submitted:.2f} s of it; the writer alone: "
                f"{args.rows / (elapsed - submitted):,.0f} rows/s)",
                flush=True,
            )
            before = asyncio.run(count(dsn))
            elapsed, _ = asyncio.run(ingest(dsn, made, size, spool))
            after = asyncio.run(count(dsn))
            print(
                f"  replayed: {args.rows} duplicate rows in {elapsed:.2f} s "
                f"({args.rows / elapsed:,.0f} rows/s), {after - before} inserted",
                flush=True,
            )
