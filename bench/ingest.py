"""`python -m bench ingest`: ledger rows/s into Postgres through the ledger writer.

Records as the proxy makes them are submitted to a `LedgerWriter` (the production code:
batches of `--batch` rows, one `INSERT … SELECT FROM json_to_recordset(…) ON CONFLICT DO
NOTHING` each) on a database of the bench's own, and the time until the last row is
committed is measured, with the CPU its Postgres backends spent per row (read from the
server's processes: the bench's Postgres must run on this machine for that figure). Then
the same records are replayed (all conflicts), which must insert nothing.

    python -m bench ingest [--rows 300000] [--batch 100 1000]

The first batch size is the default of `METERLINE_LEDGER_BATCH_SIZE`.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import asyncpg
import psutil
from sqlalchemy.engine import make_url

from bench.support import bench_database
from service.db.engine import asyncpg_dsn
from service.ledger.record import LedgerRecord, new_request_id
from service.ledger.writer import LedgerWriter
from service.settings import Settings


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


def backend_cpu_s(database: str) -> float | None:
    """CPU seconds of the Postgres backends connected to `database` (their process titles
    name it), or None when none is seen (a server on another machine, or in a container)."""
    total, seen = 0.0, False
    for process in psutil.process_iter(["cmdline"]):
        if f" {database} " not in " ".join(process.info["cmdline"] or ()) + " ":
            continue
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue
        total, seen = total + times.user + times.system, True
    return total if seen else None


@dataclass(frozen=True, slots=True)
class Ingested:
    elapsed_s: float  # from the first submit to the last commit
    submitted_s: float  # of which submitting: journaling every record
    postgres_cpu_s: float | None  # the backends' CPU over the same time


async def ingest(
    dsn: str, database: str, batch: list[LedgerRecord], batch_size: int, spool: Path
) -> Ingested:
    # The whole load is queued at once: let the queue hold it (no spill to the spool).
    writer = LedgerWriter(
        dsn, spool, batch_size=batch_size, flush_interval_s=0.05, queue_max=len(batch) + 1
    )
    await writer.start()
    cpu_before = backend_cpu_s(database)
    started = time.perf_counter()
    for record in batch:
        writer.submit(record)
    submitted = time.perf_counter() - started
    while writer.records_written + writer.records_spooled < len(batch):
        await asyncio.sleep(0.01)
    elapsed = time.perf_counter() - started
    cpu_after = backend_cpu_s(database)  # before `close`: its connections still live
    await writer.close()
    if writer.records_spooled:
        raise SystemExit(f"{writer.records_spooled} rows were spooled: the database failed")
    cpu = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
    return Ingested(elapsed, submitted, cpu)


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
    parser.add_argument(
        "--batch",
        type=int,
        nargs="+",
        default=[Settings.model_fields["ledger_batch_size"].default, 1000],
    )
    args = parser.parse_args(argv)
    spool = Path(tempfile.mkdtemp(prefix="meterline-ingest-"))
    with bench_database() as url:
        dsn = asyncpg_dsn(url)
        database = str(make_url(url).database)
        for size in args.batch:
            made = records(args.rows)
            run = asyncio.run(ingest(dsn, database, made, size, spool))
            print(
                f"batch {size:>6}: {args.rows} rows in {run.elapsed_s:.2f} s = "
                f"{args.rows / run.elapsed_s:,.0f} rows/s end to end (submitting, i.e. "
                f"journaling every record, took {run.submitted_s:.2f} s of it; the writer "
                f"alone: {args.rows / (run.elapsed_s - run.submitted_s):,.0f} rows/s); "
                f"Postgres: {per_row(run, args.rows)}",
                flush=True,
            )
            before = asyncio.run(count(dsn))
            run = asyncio.run(ingest(dsn, database, made, size, spool))
            after = asyncio.run(count(dsn))
            print(
                f"  replayed: {args.rows} duplicate rows in {run.elapsed_s:.2f} s "
                f"({args.rows / run.elapsed_s:,.0f} rows/s), {after - before} inserted; "
                f"Postgres: {per_row(run, args.rows)}",
                flush=True,
            )


def per_row(run: Ingested, rows: int) -> str:
    if run.postgres_cpu_s is None:
        return "its backends not seen on this machine"
    return f"{run.postgres_cpu_s * 1e6 / rows:.1f} µs of CPU per row"
