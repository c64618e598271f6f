"""`python -m bench streams`: streams held in flight through Meterline, as the shared tools
measure them.

Starts the shared node upstream (`mock_upstream.js --chunk-ms 20`) and `meterline serve
--workers W` on a database of its own, then runs the shared client (`streams.js`: N lanes,
each opening a new stream of 50 chunks 20 ms apart as its last one ends, for S seconds)
once direct and once through Meterline, in the same minute. Against the targets:

- time to first token, p50 and p99, added over direct: ≤ 2 ms and ≤ 10 ms;
- the worst gap between two chunks: ≤ direct's + 20 ms;
- completed streams: ≥ 98 % of direct's;
- every stream in the ledger, each with the provider's exact tokens.

Also reported: the server's CPU per chunk relayed (all its processes' work divided by the
chunks, so a load-robust figure to compare builds by), each worker's idle and peak RSS and
the memory a stream in flight holds, the event-loop lag the workers measured
(`meterline_event_loop_lag_seconds`, sampled every 0.1 s), and how long each worker ran
and waited for a core per second (on a machine whose cores the client and the upstream
share, that wait is where the added latency goes).

    python -m bench streams [--streams 500] [--seconds 6] [--workers 2] [--rounds 1] [--limits]
                            [--chunks 50] [--chunk-ms 20] [--tools DIR]

On a machine whose cores the client, the upstream and Meterline share, one run's figures
move by a third from run to run; `--rounds N` runs direct then Meterline N times on the same
server (each round an account of its own) and ends with the median of each figure added
over direct and how many rounds met each target.

The streams are a `custom` account's (no limits, as in `bench proxy`); with `--limits`, a
`basic` account's, its per-minute rate limit counted on every request (set too high to
refuse any).

`--chunks` and `--chunk-ms` shape the streams: the targets above are for 50 chunks 20 ms
apart; `--chunks 2000 --chunk-ms 2` measures what a long generation holds in memory.

`--tools` is the folder of `mock_upstream.js` and `streams.js` (default
`METERLINE_SHARED_TOOLS`, else `../shared/tools` beside the checkout); node must be on PATH.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import psutil

from bench.proxy import ADMIN_TOKEN, create_key, server_cpu_s
from bench.support import (
    ROOT,
    bench_database,
    connections_held,
    core_time,
    describe_core_time,
    free_port,
    run,
    scheduled_s,
    workers_of,
)
from service.db.engine import asyncpg_dsn

MODEL = "meta-llama/Llama-3.3-70B-Instruct"


def shared_tools(given: str | None) -> Path:
    folder = Path(given or os.environ.get("METERLINE_SHARED_TOOLS") or ROOT.parent / "shared/tools")
    if not (folder / "streams.js").exists() or not shutil.which("node"):
        raise SystemExit(f"needs node and {folder}/streams.js, mock_upstream.js (--tools DIR)")
    return folder


def client(
    tools: Path, url: str, streams: int, key: str, seconds: float, chunks: int
) -> dict[str, Any]:
    """One run of the shared client, each stream `chunks` long (its max_tokens: the mock
    sends one content chunk per token): its JSON line."""
    argv = ["node", str(tools / "streams.js"), url, str(streams), MODEL, key, str(chunks)]
    done = subprocess.run([*argv, str(seconds)], capture_output=True, text=True, check=True)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


class Sampler:
    """The workers' summed RSS every 0.2 s, its peak kept, while the load runs; once, 1.5 s
    in, the streams' connections each worker holds; and each worker's time on a core and
    waiting for one, per second of the run (on a machine whose cores the load generator
    and the upstream share, the wait is where latency goes)."""

    def __init__(self, workers: list[psutil.Process], port: int) -> None:
        self.workers = workers
        self.port = port
        self.peak = 0
        self.split: list[int] = []
        self.cores: list[tuple[float, float]] = []  # per worker: (ran, waited) ms per s
        self._scheduled: list[tuple[float, float] | None] = []
        self._started = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        return sum(p.memory_info().rss for p in self.workers)

    def _run(self) -> None:
        started = time.monotonic()
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, self.rss())
            if not self.split and time.monotonic() - started > 1.5:
                self.split = connections_held(self.workers, self.port)

    def __enter__(self) -> Sampler:
        self._scheduled = [scheduled_s(p.pid) for p in self.workers]
        self._started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.cores = core_time(self.workers, self._scheduled, time.monotonic() - self._started)


def lag_buckets(metrics: str) -> list[tuple[float, float]]:
    """The event-loop lag histogram of all workers: (upper bound, samples up to it)."""
    buckets: list[tuple[float, float]] = []
    for line in metrics.splitlines():
        if line.startswith("meterline_event_loop_lag_seconds_bucket"):
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float(bound), float(line.rsplit(" ", 1)[1])))
    return buckets


def loop_lag(metrics: str, before: str = "") -> tuple[int, int, str]:
    """Samples of the event-loop lag in all, those over 100 ms, and the bucket of the worst,
    since the `before` snapshot of the metrics."""
    earlier = dict(lag_buckets(before))
    buckets = [(bound, count - earlier.get(bound, 0.0)) for bound, count in lag_buckets(metrics)]
    if not buckets:
        return 0, 0, "n/a"
    total = int(buckets[-1][1])
    within = next((count for bound, count in buckets if bound >= 0.1), total)
    worst = next((bound for bound, count in buckets if count >= total), float("inf"))
    below = max((bound for bound, _ in buckets if bound < worst), default=0.0)
    return total, total - int(within), f"{below * 1000:.0f}-{worst * 1000:.0f} ms"


def ledger(database_url: str, account_id: str, expected: int, chunks: int) -> tuple[int, int, int]:
    """Rows of the account once the writer caught up, those served (200), and those of
    them whose tokens are not the provider's exact count."""

    async def read() -> tuple[int, int, int]:
        connection = await asyncpg.connect(asyncpg_dsn(database_url))
        try:
            row = await connection.fetchrow(
                "SELECT count(*) AS rows, count(*) FILTER (WHERE status_code = 200) AS served,"
                " count(*) FILTER (WHERE status_code = 200 AND (completion_tokens <> $2"
                "   OR usage_source <> 'upstream')) AS inexact"
                " FROM usage_ledger WHERE account_id = $1::uuid",
                account_id,
                chunks,
            )
            return int(row["rows"]), int(row["served"]), int(row["inexact"])
        finally:
            await connection.close()

    deadline = time.monotonic() + 30
    counts = asyncio.run(read())
    while counts[0] < expected and time.monotonic() < deadline:
        time.sleep(0.2)
        counts = asyncio.run(read())
    return counts


def expected_rows(args: argparse.Namespace, result: dict[str, Any]) -> int:
    """The streams of a run, counting the ones the client opens first to warm its
    connections (up to 20, not in its figures)."""
    streams: int = args.streams
    return int(result["streams"]) + min(streams, 20)


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench streams", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--streams", type=int, default=500, help="streams held in flight")
    parser.add_argument("--seconds", type=float, default=6.0, help="how long they are held")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--rounds", type=int, default=1, help="direct then Meterline, this many times"
    )
    parser.add_argument("--chunks", type=int, default=50, help="content chunks of a stream")
    parser.add_argument(
        "--chunk-ms", type=int, default=20, help="the upstream's wait between two chunks"
    )
    parser.add_argument("--tools", help="folder of streams.js and mock_upstream.js")
    parser.add_argument(
        "--limits",
        action="store_true",
        help="stream as a `basic` account: its rate limit counted (set too high to refuse)",
    )
    args = parser.parse_args(argv)
    tools = shared_tools(args.tools)
    work = Path(tempfile.mkdtemp(prefix="meterline-bench-streams-"))
    print(f"logs in {work}; {os.cpu_count()} CPUs; load {os.getloadavg()[0]:.2f}", flush=True)
    upstream_port, meterline_port = free_port(), free_port()
    upstream = f"http://127.0.0.1:{upstream_port}"
    meterline = f"http://127.0.0.1:{meterline_port}"
    providers = work / "providers.yaml"
    providers.write_text(
        "providers:\n"
        "  - name: node\n"
        f"    base_url: {upstream}/v1\n"
        "    models: ['*']\n"
        "    stream_usage: inject\n"
    )
    with bench_database() as database_url:
        env = {
            "METERLINE_DATABASE_URL": database_url,
            "METERLINE_ADMIN_TOKEN": ADMIN_TOKEN,
            "METERLINE_PROVIDERS": str(providers),
            "METERLINE_DATA_DIR": str(work / "data"),
            "METERLINE_ACCESS_LOG": "false",
            "METERLINE_LOG_LEVEL": "warning",
            "METERLINE_TIER_BASIC_RPM": "100000000",
        }
        upstream_js = str(tools / "mock_upstream.js")
        node = ["node", upstream_js, str(upstream_port), "--chunk-ms", str(args.chunk_ms)]
        serve = [sys.executable, "-m", "service", "serve", "--port", str(meterline_port)]
        with (
            run(node, f"{upstream}/v1/models", {}, work / "upstream.log"),
            run(
                [*serve, "--workers", str(args.workers)],
                f"{meterline}/healthz",
                env,
                work / "meterline.log",
            ) as server,
        ):
            tier = "basic" if args.limits else "custom"
            _, warm_key = create_key(meterline, tier)
            chat = "/v1/chat/completions"
            workers = workers_of(psutil.Process(server.pid))
            # Every worker past its start before anything is measured.
            client(tools, f"{meterline}{chat}", 20, warm_key, 1, args.chunks)
            idle = [p.memory_info().rss for p in workers]
            metrics_url = f"{meterline}/metrics"
            admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
            metrics = httpx.get(metrics_url, headers=admin).text
            rounds: list[Added] = []
            for round_number in range(1, args.rounds + 1):
                account_id, key = create_key(meterline, tier)  # this round's rows, no others
                direct = client(
                    tools, f"{upstream}{chat}", args.streams, "x", args.seconds, args.chunks
                )
                before = server_cpu_s(server.pid)
                with Sampler(workers, meterline_port) as sampler:
                    metered = client(
                        tools, f"{meterline}{chat}", args.streams, key, args.seconds, args.chunks
                    )
                cpu = server_cpu_s(server.pid) - before
                metrics, earlier = httpx.get(metrics_url, headers=admin).text, metrics
                rows = ledger(database_url, account_id, expected_rows(args, metered), args.chunks)
                lag = loop_lag(metrics, earlier)
                heading = f"round {round_number} of {args.rounds}: " if args.rounds > 1 else ""
                report(args, heading, direct, metered, cpu, idle, sampler, lag, rows)
                rounds.append(Added.of(direct, metered))
    if len(rounds) > 1:
        summarize(rounds)


@dataclass(frozen=True, slots=True)
class Added:
    """One round against direct, as the targets read it."""

    ttft_p50_ms: float
    ttft_p99_ms: float
    worst_gap_ms: float
    completed: float  # streams through Meterline over direct's

    @classmethod
    def of(cls, direct: dict[str, Any], metered: dict[str, Any]) -> Added:
        return cls(
            ttft_p50_ms=metered["ttft_p50"] - direct["ttft_p50"],
            ttft_p99_ms=metered["ttft_p99"] - direct["ttft_p99"],
            worst_gap_ms=metered["worst_gap_ms"] - direct["worst_gap_ms"],
            completed=metered["streams"] / direct["streams"] if direct["streams"] else 0.0,
        )

    def meets(self) -> tuple[bool, bool, bool, bool]:
        return (
            self.ttft_p50_ms <= 2,
            self.ttft_p99_ms <= 10,
            self.worst_gap_ms <= 20,
            self.completed >= 0.98,
        )


def summarize(rounds: list[Added]) -> None:
    """The median of each figure over the rounds, and how many rounds met its target."""
    met = [sum(flags) for flags in zip(*(r.meets() for r in rounds), strict=True)]
    n = len(rounds)
    p50 = statistics.median(r.ttft_p50_ms for r in rounds)
    p99 = statistics.median(r.ttft_p99_ms for r in rounds)
    gap = statistics.median(r.worst_gap_ms for r in rounds)
    completed = statistics.median(r.completed for r in rounds)
    print(f"\n-- median of {n} rounds (rounds that met the target)")
    print(f"  TTFT added: p50 {p50:+.2f} ms (≤ 2: {met[0]} of {n}), ", end="")
    print(f"p99 {p99:+.2f} ms (≤ 10: {met[1]} of {n})")
    print(f"  worst gap: {gap:+.1f} ms over direct (≤ +20: {met[2]} of {n})")
    print(f"  completed: {completed:.1%} of direct's (≥ 98 %: {met[3]} of {n})")


def report(
    args: argparse.Namespace,
    heading: str,
    direct: dict[str, Any],
    metered: dict[str, Any],
    cpu: float,
    idle: list[int],
    sampler: Sampler,
    lag: tuple[int, int, str],
    rows: tuple[int, int, int],
) -> None:
    limits = "rate limit counted" if args.limits else "no limits"
    print(
        f"\n-- {heading}{args.streams} streams held {args.seconds:g}s, {args.workers} workers,"
        f" {limits}"
    )
    for label, result in (("direct", direct), ("Meterline", metered)):
        print(
            f"  {label:<10} {result['streams']:6} streams ({result['errors']} errors): TTFT p50 "
            f"{result['ttft_p50']:7.2f} ms  p99 {result['ttft_p99']:8.2f} ms  max "
            f"{result['ttft_max']:8.1f} ms; worst gap {result['worst_gap_ms']:6.1f} ms"
        )
    added = Added.of(direct, metered)
    p50_met, p99_met, gap_met, completed_met = added.meets()
    print(f"  TTFT added: p50 {added.ttft_p50_ms:+.2f} ms (≤ 2: {verdict(p50_met)}), ", end="")
    print(f"p99 {added.ttft_p99_ms:+.2f} ms (≤ 10: {verdict(p99_met)})")
    print(f"  worst gap: {added.worst_gap_ms:+.1f} ms over direct (≤ +20: {verdict(gap_met)})")
    print(f"  completed: {added.completed:.1%} of direct's (≥ 98 %: {verdict(completed_met)})")
    total, served, inexact = rows
    expected = expected_rows(args, metered)
    print(
        f"  ledger: {total} rows for {expected} streams, {served} served, {inexact} without the "
        f"provider's exact tokens — {'OK' if total == expected and inexact == 0 else 'MISMATCH'}"
    )
    chunks = metered["chunks"]
    print(
        f"  server's CPU: {cpu:.2f} s, {cpu * 1e6 / chunks:.1f} µs per chunk relayed (all work "
        f"included), {cpu * 1e3 / max(1, metered['streams']):.2f} ms per stream"
    )
    mb = 1024 * 1024
    per_stream = (sampler.peak - sum(idle)) / args.streams / 1024
    print(
        f"  RSS: idle {', '.join(f'{r / mb:.0f}' for r in idle)} MB per worker; peak "
        f"{sampler.peak / mb:.0f} MB in all; {per_stream:.0f} kB per stream in flight"
    )
    print(f"  connections per worker 1.5 s in: {' / '.join(map(str, sampler.split))}")
    if sampler.cores:
        print(f"  {describe_core_time(sampler.cores)}")
    samples, over, worst = lag
    print(f"  event-loop lag: {over} of {samples} samples over 100 ms; the worst in {worst}")
