"""`python -m bench export`: the monthly report of a month of 1,000,000 ledger rows.

Creates a database of its own on `METERLINE_DATABASE_URL` (default
postgresql://postgres@127.0.0.1:5432/test), migrates it, COPYs the rows into one month
(spread over `--accounts` accounts and `--models` models, 1 % of them in quoted tasks),
starts `meterline serve` on it and downloads `GET /billing/reports/monthly` as a client
would, `--runs` times. Reports ledger rows exported per second (the rows the report
covers, over the wall time of the whole download) and the peak RSS of the server process
(VmHWM), against the targets: ≥ 100,000 rows/s, ≤ 150 MB.

With `--raw`, the raw usage export instead: `GET /billing/usage/events/export` of the same
month (every ledger row, admin, all accounts), in rows per second against ≥ 200,000 rows/s,
with the server's RSS sampled by psutil through each download (and its VmHWM); then, once
more untimed, the rows parsed back and their count, token and exact cost sums compared with
`GET /billing/usage`. `--format all` measures each format in turn on the same month, each
against a server of its own (so each peak RSS is that format's), and ends with a table.

    python -m bench export [--rows 1000000] [--accounts 1000] [--models 8] [--runs 3]
                           [--format csv|json] [--keep]
    python -m bench export --raw [--format csv|jsonl|parquet|all] [--rows …] [--runs …]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import psutil
from sqlalchemy.engine import make_url

from pricing.invoice import BillingPeriod
from service.db.engine import asyncpg_dsn
from service.db.migrate import upgrade
from service.reports.schemas import COLUMNS

ROOT = Path(__file__).resolve().parents[1]
ADMIN_TOKEN = "bench-admin-" + secrets.token_hex(8)
TARGET_ROWS_PER_S = 100_000
TARGET_RSS_MB = 150
TARGET_RAW_ROWS_PER_S = 200_000
RAW_FORMATS = ("csv", "jsonl", "parquet")
LEDGER_COLUMNS = (
    "request_id",
    "occurred_at",
    "account_id",
    "key_id",
    "task_id",
    "task_type",
    "endpoint",
    "requested_model",
    "provider",
    "stream",
    "status_code",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "usage_source",
    "cost_usd",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _with_database(url: str, name: str) -> str:
    return make_url(url).set(database=name).render_as_string(hide_password=False)


def _ledger_rows(
    count: int,
    start: datetime,
    accounts: list[uuid.UUID],
    models: list[str],
    quoted: list[tuple[uuid.UUID, str]],
    keys: dict[uuid.UUID, list[uuid.UUID]] | None = None,
) -> Iterator[tuple[object, ...]]:
    rng = random.Random(42)
    # Spread over 28 days in the order the proxy appends them, each up to 2 s (a request's
    # time) off its place: the heap is in about `occurred_at` order, as a live ledger's is.
    step_us = 28 * 24 * 3600 * 10**6 // max(count, 1)
    for i in range(count):
        if quoted and i % 100 == 0:
            account, task_id = quoted[(i // 100) % len(quoted)]
            task_type: str | None = "summarize"
        else:
            account, task_id, task_type = accounts[i % len(accounts)], None, None
        prompt = rng.randint(10, 4000)
        completion = rng.randint(0, 1000)
        yield (
            f"req_bench_{i:010d}",
            start + timedelta(microseconds=i * step_us + rng.randrange(2_000_000)),
            account,
            keys[account][i % len(keys[account])] if keys else None,
            task_id,
            task_type,
            "chat",
            # Every account uses every model: accounts x models report rows.
            models[(i // len(accounts)) % len(models)],
            "bench",
            False,
            200,
            prompt,
            completion,
            prompt + completion,
            "upstream",
            # An exact cost at $0.40 / M tokens: no float anywhere.
            Decimal(prompt + completion) * Decimal("0.0000004"),
        )


async def _populate(
    dsn: str,
    rows: int,
    n_accounts: int,
    n_models: int,
    start: datetime,
    keys_per_account: int = 0,
) -> None:
    connection = await asyncpg.connect(dsn)
    try:
        accounts = [uuid.uuid4() for _ in range(n_accounts)]
        await connection.copy_records_to_table(
            "accounts",
            records=[(a, f"bench account {i:05d}") for i, a in enumerate(accounts)],
            columns=["id", "name"],
        )
        keys = {a: [uuid.uuid4() for _ in range(keys_per_account)] for a in accounts}
        if keys_per_account:
            await connection.copy_records_to_table(
                "api_keys",
                records=[
                    (k, a, f"key {n}", f"ml-bench{n:03d}", uuid.uuid4().bytes + k.bytes)
                    for a, ks in keys.items()
                    for n, k in enumerate(ks)
                ],
                columns=["id", "account_id", "name", "prefix", "key_hash"],
            )
        await connection.execute("SELECT meterline_ensure_usage_partition($1)", start)
        # Quoted tasks: one per tenth account, so the report breaks out their task type.
        quoted: list[tuple[uuid.UUID, str]] = []
        for account in accounts[::10]:
            quote = await connection.fetchval(
                "INSERT INTO quotes (account_id, task_type, model, basis, sample_size,"
                " confidence, margin, expected_cost_usd, quantile_cost_usd, price_usd,"
                " valid_until) VALUES ($1, 'summarize', 'bench-model-0', 'estimate', 0, 0.9,"
                " 0.2, 0.01, 0.01, 0.05, now()) RETURNING id",
                account,
            )
            task_id = f"bench-task-{account.hex[:12]}"
            # Accepted as the month began, succeeded within it: billed its fixed price.
            await connection.execute(
                "INSERT INTO tasks (account_id, external_id, task_type, model, quote_id,"
                " fixed_price_usd, status, created_at, completed_at, billed_as)"
                " VALUES ($1, $2, 'summarize', 'bench-model-0', $3, 0.05, 'succeeded',"
                " $4::timestamptz, $4::timestamptz + interval '20 days', 'fixed_price')",
                account,
                task_id,
                quote,
                start,
            )
            quoted.append((account, task_id))
        models = [f"bench-model-{m}" for m in range(n_models)]
        batch: list[tuple[object, ...]] = []
        ledger = _ledger_rows(
            rows, start, accounts, models, quoted, keys if keys_per_account else None
        )
        for record in ledger:
            batch.append(record)
            if len(batch) == 100_000:
                await connection.copy_records_to_table(
                    "usage_ledger", records=batch, columns=LEDGER_COLUMNS
                )
                batch.clear()
        if batch:
            await connection.copy_records_to_table(
                "usage_ledger", records=batch, columns=LEDGER_COLUMNS
            )
        # What autovacuum would have done by the time a month is exported.
        await connection.execute("VACUUM ANALYZE usage_ledger")
        await connection.execute("ANALYZE tasks, accounts, invoices")
    finally:
        await connection.close()


def _rss_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for {pid}")


def _export(url: str, period: str, fmt: str) -> tuple[float, int, int, bytes]:
    """(seconds, bytes, lines, last line) of one whole download."""
    size = lines = 0
    tail = b""
    began = time.perf_counter()
    with httpx.stream(
        "GET",
        f"{url}/billing/reports/monthly",
        params={"period": period, "format": fmt},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        timeout=600,
    ) as response:
        response.raise_for_status()
        for chunk in response.iter_bytes():
            size += len(chunk)
            lines += chunk.count(b"\n")
            tail = (tail + chunk)[-2048:]
    return time.perf_counter() - began, size, lines, tail.rstrip(b"\n").rsplit(b"\n", 1)[-1]


async def _direct(url: str, period: str, fmt: str) -> None:
    """The service function alone in this process: the export's own footprint."""
    from service.db.engine import create_engine
    from service.reports.service import export_monthly

    engine = create_engine(url, pool_size=1)
    idle_kb = _rss_kb(os.getpid(), "VmRSS")
    began = time.perf_counter()
    size = 0
    async for chunk in export_monthly(engine, period, fmt, None):  # type: ignore[arg-type]
        size += len(chunk)
    seconds = time.perf_counter() - began
    await engine.dispose()
    peak_kb = _rss_kb(os.getpid(), "VmHWM")
    print(f"{seconds} {size} {idle_kb} {peak_kb}")


def main(argv: list[str]) -> None:
    if argv[:1] == ["--direct"]:
        asyncio.run(_direct(*argv[1:4]))
        return
    parser = argparse.ArgumentParser(prog="python -m bench export", description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--accounts", type=int, default=1000)
    parser.add_argument("--models", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--format", choices=("csv", "json", "jsonl", "parquet", "all"), default="csv"
    )
    parser.add_argument("--raw", action="store_true", help="The raw usage export instead.")
    parser.add_argument("--keep", action="store_true", help="Keep the database afterwards.")
    parser.add_argument(
        "--database",
        help="Measure on this database, left loaded by --keep with the same --rows:"
        " nothing is created, loaded or dropped.",
    )
    args = parser.parse_args(argv)
    if (args.format in ("jsonl", "parquet", "all")) != args.raw and args.format != "csv":
        parser.error(f"--format {args.format} is {'not ' if args.raw else ''}for --raw")

    server = os.environ.get("METERLINE_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
    name = f"meterline_bench_export_{secrets.token_hex(4)}"
    url = args.database or _with_database(server, name)
    month = BillingPeriod.of(datetime.now(UTC)).previous()
    start, period = month.start, str(month)
    admin = asyncpg_dsn(server)
    if not args.database:
        asyncio.run(_admin(admin, f'CREATE DATABASE "{name}"'))
    try:
        if not args.database:
            upgrade(url)
            began = time.perf_counter()
            asyncio.run(_populate(asyncpg_dsn(url), args.rows, args.accounts, args.models, start))
            seconds = time.perf_counter() - began
            print(f"loaded {args.rows:,} ledger rows for {period} in {seconds:.1f}s")
        if args.raw:
            formats = RAW_FORMATS if args.format == "all" else (args.format,)
            measured = [_measure_raw(url, start, fmt, args) for fmt in formats]
            if len(measured) > 1:
                _raw_table(args.rows, measured)
        else:
            _measure(url, period, args)
            _measure_direct(url, period, args)
    finally:
        if args.keep or args.database:
            print(f"database kept: {url}")
        else:
            asyncio.run(_admin(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def _admin(dsn: str, sql: str) -> None:
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


def _measure(url: str, period: str, args: argparse.Namespace) -> None:
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        env = {
            **os.environ,
            "METERLINE_DATABASE_URL": url,
            "METERLINE_ADMIN_TOKEN": ADMIN_TOKEN,
            "METERLINE_DATA_DIR": tmp,
        }
        env.pop("METERLINE_PROVIDERS", None)
        log = open(Path(tmp) / "serve.log", "wb")  # noqa: SIM115
        process = subprocess.Popen(
            [sys.executable, "-m", "service", "serve", "--port", str(port), "--workers", "1"],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            _wait(f"{base}/healthz", process)
            idle_kb = _rss_kb(process.pid, "VmRSS")
            results = []
            for run in range(1, args.runs + 1):
                seconds, size, lines, last = _export(base, period, args.format)
                rate = args.rows / seconds
                results.append(rate)
                print(
                    f"run {run}: {seconds:.2f}s, {lines - 2:,} report rows, {size / 1e6:.2f} MB,"
                    f" {rate:,.0f} ledger rows/s"
                )
            if args.format == "csv":
                requests = int(last.split(b",")[COLUMNS.index("requests")])
                assert requests == args.rows, f"totals row counts {requests} requests"
            peak_kb = _rss_kb(process.pid, "VmHWM")
        finally:
            process.terminate()
            process.wait(timeout=30)
            log.close()
    best = max(results)
    peak_mb = peak_kb / 1024
    print(
        f"\nexport of {args.rows:,} ledger rows ({args.format}):"
        f" best {best:,.0f} rows/s (median {sorted(results)[len(results) // 2]:,.0f}),"
        f" target ≥ {TARGET_ROWS_PER_S:,} → {'ok' if best >= TARGET_ROWS_PER_S else 'MISSED'}"
    )
    print(
        f"server peak RSS {peak_mb:.0f} MB (idle after start-up {idle_kb / 1024:.0f} MB;"
        f" the export added {(peak_kb - idle_kb) / 1024:.0f} MB),"
        f" target ≤ {TARGET_RSS_MB} MB → {'ok' if peak_mb <= TARGET_RSS_MB else 'MISSED'}"
    )


def _measure_direct(url: str, period: str, args: argparse.Namespace) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench", "export", "--direct", url, period, args.format],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    seconds, _, idle_kb, peak_kb = result.stdout.split()
    print(
        f"service function alone (python -m bench export --direct): {float(seconds):.2f}s,"
        f" {args.rows / float(seconds):,.0f} ledger rows/s, process peak RSS"
        f" {int(peak_kb) / 1024:.0f} MB (before the export {int(idle_kb) / 1024:.0f} MB)"
    )


def _wait(url: str, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"meterline serve exited with {process.returncode}")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise TimeoutError(url)


def _serving(url: str, tmp: str) -> tuple[subprocess.Popen[bytes], str, Any]:
    """`meterline serve` (one worker) on the bench's database: (process, base URL, log)."""
    port = _free_port()
    env = {
        **os.environ,
        "METERLINE_DATABASE_URL": url,
        "METERLINE_ADMIN_TOKEN": ADMIN_TOKEN,
        "METERLINE_DATA_DIR": tmp,
    }
    env.pop("METERLINE_PROVIDERS", None)
    log = open(Path(tmp) / "serve.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, "-m", "service", "serve", "--port", str(port), "--workers", "1"],
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    return process, f"http://127.0.0.1:{port}", log


class _RssSampler(threading.Thread):
    """The server's RSS (psutil) every 20 ms while a download runs; `peak` in bytes. Also
    the CPU time the server and the database's backends (and their parallel workers) spent
    meanwhile: on a shared machine the wall time depends on the neighbours, the CPU time a
    stage needs per row does not."""

    def __init__(self, pid: int, database: str) -> None:
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.peak = self.process.memory_info().rss
        self.database = database
        self.server_cpu = self._cpu(self.process)
        self.postgres_cpu: dict[int, tuple[float, float]] = {}
        self._backends()
        self.done = threading.Event()

    @staticmethod
    def _cpu(process: psutil.Process) -> float:
        times = process.cpu_times()
        return float(times.user + times.system)

    def _backends(self) -> None:
        leaders: set[int] = set()
        for process in psutil.process_iter(["name", "cmdline"]):
            title = " ".join(process.info["cmdline"] or ())
            if process.info["name"] != "postgres" and not title.startswith("postgres:"):
                continue
            mine = f" {self.database} " in title
            worker = "parallel worker for PID" in title
            if not (mine or worker):
                continue
            leader = re.search(r"parallel worker for PID (\d+)", title)
            if worker and (
                leader is None or int(leader[1]) not in leaders | set(self.postgres_cpu)
            ):
                continue
            if mine:
                leaders.add(process.pid)
            try:
                now = self._cpu(process)
            except psutil.Error:
                continue
            first, _ = self.postgres_cpu.get(process.pid, (0.0 if worker else now, now))
            self.postgres_cpu[process.pid] = (first, now)

    def run(self) -> None:
        tick = 0
        while not self.done.wait(0.02):
            self.peak = max(self.peak, self.process.memory_info().rss)
            tick += 1
            if tick % 10 == 0:
                self._backends()
        self._backends()
        self.server_cpu = self._cpu(self.process) - self.server_cpu

    def postgres_seconds(self) -> float:
        return sum(last - first for first, last in self.postgres_cpu.values())


def _raw_params(start: datetime, fmt: str) -> dict[str, str]:
    end = BillingPeriod.of(start).end
    return {"start": start.isoformat(), "end": end.isoformat(), "format": fmt}


def _raw_export(base: str, start: datetime, fmt: str, sink: Any = None) -> tuple[float, int]:
    """(seconds, bytes) of one whole download of the month's raw rows."""
    size = 0
    began = time.perf_counter()
    with httpx.stream(
        "GET",
        f"{base}/billing/usage/events/export",
        params=_raw_params(start, fmt),
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        timeout=600,
    ) as response:
        response.raise_for_status()
        for chunk in response.iter_bytes():
            size += len(chunk)
            if sink is not None:
                sink.write(chunk)
    return time.perf_counter() - began, size


def _raw_sums(path: Path, fmt: str) -> dict[str, Any]:
    """Row count, token sums and exact cost sum of a raw export file, parsed back."""
    import csv

    import orjson

    fields = ("prompt_tokens", "completion_tokens", "total_tokens")
    sums: dict[str, Any] = {"requests": 0, **dict.fromkeys(fields, 0), "cost_usd": Decimal(0)}

    def add(row: dict[str, Any]) -> None:
        sums["requests"] += 1
        for field in fields:
            sums[field] += int(row[field])
        if row["cost_usd"] not in (None, ""):
            sums["cost_usd"] += Decimal(row["cost_usd"])

    if fmt == "parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(columns=[*fields, "cost_usd"]):
            for row in batch.to_pylist():
                add(row)
    elif fmt == "csv":
        with path.open(newline="") as text:
            for row in csv.DictReader(text):
                add(row)
    else:
        with path.open("rb") as lines:
            for line in lines:
                add(orjson.loads(line))
    return sums


def _measure_raw(url: str, start: datetime, fmt: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        process, base, log = _serving(url, tmp)
        try:
            _wait(f"{base}/healthz", process)
            idle_kb = _rss_kb(process.pid, "VmRSS")
            results = []
            sampled_peak = 0
            size = 0
            cpu: list[tuple[float, float, float]] = []
            for run in range(1, args.runs + 1):
                sampler = _RssSampler(process.pid, make_url(url).database or "")
                sampler.start()
                client_cpu = time.process_time()
                seconds, size = _raw_export(base, start, fmt)
                client_cpu = time.process_time() - client_cpu
                sampler.done.set()
                sampler.join()
                sampled_peak = max(sampled_peak, sampler.peak)
                rate = args.rows / seconds
                results.append(rate)
                print(
                    f"{fmt} run {run}: {seconds:.2f}s, {size / 1e6:.1f} MB, {rate:,.0f} rows/s,"
                    f" server RSS peak (psutil) {sampler.peak / 2**20:.0f} MB,"
                    f" load average {os.getloadavg()[0]:.2f}; CPU seconds: Postgres"
                    f" {sampler.postgres_seconds():.2f}, server {sampler.server_cpu:.2f},"
                    f" client {client_cpu:.2f}"
                )
                cpu.append((sampler.postgres_seconds(), sampler.server_cpu, client_cpu))
            hwm_kb = _rss_kb(process.pid, "VmHWM")
            # Untimed: the rows parsed back, against the usage report of the same range.
            exported = Path(tmp) / f"export.{fmt}"
            with exported.open("wb") as sink:
                _raw_export(base, start, fmt, sink)
            sums = _raw_sums(exported, fmt)
            params = {k: v for k, v in _raw_params(start, fmt).items() if k != "format"}
            [report] = httpx.get(
                f"{base}/billing/usage",
                params=params,
                headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                timeout=600,
            ).json()["data"]
        finally:
            process.terminate()
            process.wait(timeout=30)
            log.close()
    expected = {k: Decimal(report[k]) if k == "cost_usd" else report[k] for k in sums}
    assert sums["requests"] == args.rows, f"{sums['requests']} rows exported"
    assert sums == expected, f"export {sums} != GET /billing/usage {expected}"
    best = max(results)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"raw export of {args.rows:,} ledger rows ({fmt}):"
        f" best {best:,.0f} rows/s (median {sorted(results)[len(results) // 2]:,.0f}),"
        f" target ≥ {TARGET_RAW_ROWS_PER_S:,} → "
        f"{'ok' if best >= TARGET_RAW_ROWS_PER_S else 'MISSED'}"
    )
    print(
        f"server peak RSS {sampled_peak / 2**20:.0f} MB sampled by psutil, VmHWM"
        f" {hwm_kb / 1024:.0f} MB (idle after start-up {idle_kb / 1024:.0f} MB)"
    )
    print(
        f"parsed back: {sums['requests']:,} rows, {sums['total_tokens']:,} tokens,"
        f" ${sums['cost_usd']} — equal to GET /billing/usage"
    )
    print(f"load average after measuring: {load}\n")
    return {
        "format": fmt,
        "best": best,
        "median": sorted(results)[len(results) // 2],
        "mb": size / 1e6,
        "peak_mb": sampled_peak / 2**20,
        "hwm_mb": hwm_kb / 1024,
        "idle_mb": idle_kb / 1024,
        "load": load,
        # The least CPU each stage needed over the runs.
        "cpu": tuple(min(stage) for stage in zip(*cpu, strict=True)),
    }


def _raw_table(rows: int, measured: list[dict[str, Any]]) -> None:
    print(f"raw export, {rows:,} ledger rows, best of the runs per format:")
    print(
        "| format | rows/s (best) | rows/s (median) | size | server peak RSS | idle RSS"
        " | CPU s: Postgres / server / client | load |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |")
    for m in measured:
        postgres, server, client = m["cpu"]
        print(
            f"| {m['format']} | {m['best']:,.0f} | {m['median']:,.0f} | {m['mb']:.0f} MB"
            f" | {max(m['peak_mb'], m['hwm_mb']):.0f} MB | {m['idle_mb']:.0f} MB"
            f" | {postgres:.1f} / {server:.1f} / {client:.1f} | {m['load']} |"
        )
