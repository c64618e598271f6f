"""`python -m bench proxy`: Meterline's hot path against the targets of DESIGN.md.

Starts the mock provider (the zero-latency upstream), a bare pass-through proxy (the
yardstick: forwards and nothing else) and `meterline serve` with its ledger on Postgres
(`METERLINE_DATABASE_URL`, default postgresql://postgres@127.0.0.1:5432/test; the run
creates and drops a database of its own there). Then, in one run:

- non-streamed, with `wrk` (installed with apt-get if missing) at 8 and 64 connections:
  direct to the provider, through the bare proxy, through Meterline — req/s, latency
  percentiles, their ratios, and the ledger's row count against the requests served;
- streamed: 500 concurrent streams of 50 chunks 20 ms apart (an asyncio/aiohttp client),
  time to first token direct vs through Meterline, and stalls.

With a zero-latency provider, `wrk`'s connections never wait: 8 of them keep a worker busy
(each answer is followed at once by the next request), so what the runs above call added
latency is mostly queueing for a core. `--think-ms N` makes each connection wait N ms
between an answer and its next request, the load a proxy meets in production: well
below what it can serve, with latency that is its own.

With `--routing`, only the cost of routing: a model object of five candidates against the
same request naming its model, alternated, at the lowest connection count.

    python -m bench proxy [--workers 1 2] [--duration 10] [--streams 500] [--clients]
    python -m bench proxy --connections 8 --think-ms 5 --streams 0
    python -m bench proxy --routing [--rounds 3] [--connections 8]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import secrets
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import httpx
import psutil

from bench.support import (
    bench_database,
    connections_held,
    core_time,
    describe_core_time,
    ensure_wrk,
    free_port,
    run,
    scheduled_s,
    workers_of,
)
from service.db.engine import asyncpg_dsn

ROOT = Path(__file__).resolve().parents[1]
MODEL = "meta-llama/Llama-3.3-70B-Instruct"
BODY = (
    '{"model":"' + MODEL + '","messages":[{"role":"system","content":"You are terse."},'
    '{"role":"user","content":"Summarise the ledger in a few words."}],"max_tokens":16}'
)
PROVIDER_KEY = "sk-bench-" + secrets.token_hex(8)
ADMIN_TOKEN = "bench-admin-" + secrets.token_hex(8)


# -- wrk ---------------------------------------------------------------------------------


@dataclass
class WrkResult:
    rps: float
    requests: int
    errors: int
    latency_ms: dict[str, float] = field(default_factory=dict)  # "50%" → ms
    # The server's CPU (all its processes) per request served: the load-robust figure.
    cpu_us: float | None = None
    # The connections each worker held 1 s in (keep-alive ones stay where accepted).
    split: list[int] = field(default_factory=list)
    # Per worker, ms per second its main thread ran on a core and waited for one.
    cores: list[tuple[float, float]] = field(default_factory=list)


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(number) * _UNITS[unit]


# The same request with a model object of five priced candidates, weighing everything
# routing weighs (`--routing`): what the object costs on the hot path against a name.
CANDIDATES = [
    "meta-llama/Llama-3.3-70B-Instruct",
    "meta-llama/Meta-Llama-3.1-70B-Instruct",
    "meta-llama/Meta-Llama-3-70B-Instruct",
    "meta-llama/Meta-Llama-3.1-8B-Instruct",
    "meta-llama/Llama-3.2-3B-Instruct",
]
ROUTED_BODY = BODY.replace(
    '"' + MODEL + '"',
    '{"llms":['
    + ",".join(f'"{c}"' for c in CANDIDATES)
    + '],"max_input_cost":"1.00","weights":{"price":1,"error":1,"start_latency":1,'
    '"end_latency":1}}',
)


def wrk(
    binary: str,
    url: str,
    connections: int,
    seconds: int,
    key: str | None,
    work: Path,
    body: str = BODY,
    think_ms: int = 0,
) -> WrkResult:
    """A `wrk` run; with `think_ms`, each connection waits that long between an answer and
    its next request (wrk's `delay()`), which its latency figures do not count."""
    script = work / f"post-{secrets.token_hex(3)}.lua"
    auth = f'wrk.headers["Authorization"] = "Bearer {key}"\n' if key else ""
    think = f"function delay() return {think_ms} end\n" if think_ms else ""
    script.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = '{body}'\n"
        'wrk.headers["Content-Type"] = "application/json"\n' + auth + think
    )
    threads = 1 if connections <= 8 else 2
    out = subprocess.run(
        [
            binary,
            f"-t{threads}",
            f"-c{connections}",
            f"-d{seconds}s",
            "--latency",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    latency = {m[0]: _ms(m[1]) for m in re.findall(r"^\s+(\d+%)\s+([\d.]+\w+)\s*$", out, re.M)}
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    )
    errors = int(non_2xx.group(1)) if non_2xx else 0
    if socket_errors:
        errors += sum(int(g) for g in socket_errors.groups())
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    return WrkResult(rps, requests, errors, latency)


# -- streams -----------------------------------------------------------------------------


@dataclass
class StreamResult:
    completed: int = 0
    failed: int = 0
    ttft_ms: list[float] = field(default_factory=list)
    max_gap_ms: list[float] = field(default_factory=list)

    def pct(self, values: list[float], q: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def stream_load(url: str, key: str, concurrency: int, seconds: float) -> StreamResult:
    """`concurrency` clients, each streaming one completion after another for `seconds`;
    starts spread over the first second so the load is steady, not one burst."""
    body = (
        '{"model":"' + MODEL + '","stream":true,"messages":[{"role":"user","content":"Hi"}],'
        '"mock":{"chunks":50,"chunk_delay_ms":20}}'
    ).encode()
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    result = StreamResult()
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        end = time.perf_counter() + seconds

        async def client(i: int) -> None:
            await asyncio.sleep(i / concurrency)
            while time.perf_counter() < end:
                started = time.perf_counter()
                first = last = 0.0
                gap = 0.0
                try:
                    async with session.post(url, data=body, headers=headers) as response:
                        if response.status != 200:
                            result.failed += 1
                            await response.read()
                            continue
                        async for _ in response.content.iter_any():
                            now = time.perf_counter()
                            if not first:
                                first = now
                            elif now - last > gap:
                                gap = now - last
                            last = now
                except (aiohttp.ClientError, TimeoutError):
                    result.failed += 1
                    continue
                result.completed += 1
                result.ttft_ms.append((first - started) * 1000)
                result.max_gap_ms.append(gap * 1000)

        await asyncio.gather(*(client(i) for i in range(concurrency)))
    return result


# -- Meterline ----------------------------------------------------------------------------


def create_key(base: str, tier: str = "custom") -> tuple[str, str]:
    """An account of `tier` and a key of it. The `custom` tier has no default rate limit:
    the bench measures the proxy, not limits."""
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as c:
        account = c.post("/billing/accounts", json={"name": "bench", "tier": tier})
        account.raise_for_status()
        key = c.post(f"/billing/accounts/{account.json()['id']}/keys", json={})
        key.raise_for_status()
        return str(account.json()["id"]), str(key.json()["key"])


def ledger_count(database_url: str, account_id: str, expect_at_least: int) -> int:
    """Rows of the account once the writer has caught up (the count stops growing)."""

    async def count() -> int:
        connection = await asyncpg.connect(asyncpg_dsn(database_url))
        try:
            value: int = await connection.fetchval(
                "SELECT count(*) FROM usage_ledger WHERE account_id = $1::uuid", account_id
            )
            return value
        finally:
            await connection.close()

    previous, stable_since = -1, time.monotonic()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        current = asyncio.run(count())
        if current != previous:
            previous, stable_since = current, time.monotonic()
        elif current >= expect_at_least and time.monotonic() - stable_since > 1.0:
            break
        time.sleep(0.2)
    return previous


def fmt(result: WrkResult) -> str:
    lat = result.latency_ms
    return (
        f"{result.rps:9.0f} req/s  p50 {lat.get('50%', 0):7.2f} ms  p90 {lat.get('90%', 0):7.2f} ms"
        f"  p99 {lat.get('99%', 0):7.2f} ms  ({result.requests} requests, {result.errors} errors)"
    )


def bench_workers(
    workers: int,
    args: argparse.Namespace,
    wrk_bin: str,
    database_url: str,
    upstream: str,
    work: Path,
) -> None:
    print(
        f"\n=== Meterline with --workers {workers} (bare pass-through with the same) ===",
        flush=True,
    )
    providers = work / "providers.yaml"
    providers.write_text(
        "providers:\n"
        "  - name: mock\n"
        f"    base_url: {upstream}/v1\n"
        "    api_key_env: BENCH_PROVIDER_KEY\n"
        "    models: ['mock-*', 'meta-llama/*']\n"
        "    stream_usage: inject\n"
    )
    meterline_port, bare_port = free_port(), free_port()
    env = {
        "METERLINE_DATABASE_URL": database_url,
        "METERLINE_ADMIN_TOKEN": ADMIN_TOKEN,
        "METERLINE_PROVIDERS": str(providers),
        "METERLINE_DATA_DIR": str(work / f"data-{workers}"),
        "METERLINE_LOG_LEVEL": "warning",
        "BENCH_PROVIDER_KEY": PROVIDER_KEY,
        "BENCH_UPSTREAM": f"{upstream}/v1",
        "BENCH_CLIENT": "aiohttp",
    }
    meterline_url = f"http://127.0.0.1:{meterline_port}"
    bare_url = f"http://127.0.0.1:{bare_port}"
    uvicorn = [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        "--loop",
        "uvloop",
        "--http",
        "httptools",
        "--log-level",
        "warning",
        "--workers",
        str(workers),
    ]
    with (
        run(
            [
                sys.executable,
                "-m",
                "service",
                "serve",
                "--port",
                str(meterline_port),
                "--workers",
                str(workers),
            ],
            f"{meterline_url}/healthz",
            env,
            work / f"meterline-{workers}.log",
        ) as meterline,
        run(
            [*uvicorn, "--port", str(bare_port), "bench.passthrough:create_app"],
            f"{bare_url}/v1/chat/completions",
            env,
            work / f"bare-{workers}.log",
        ) as bare_server,
    ):
        account_id, key = create_key(meterline_url)
        chat = "/v1/chat/completions"
        if args.routing:
            bench_routing(args, wrk_bin, f"{meterline_url}{chat}", key, work, meterline.pid)
            return
        served = 0  # responses wrk received from Meterline, warm-ups included
        runs = 0
        for connections in args.connections:
            # Warm up connection pools and caches, then measure each path in turn.
            for url, auth in (
                (f"{upstream}{chat}", PROVIDER_KEY),
                (f"{bare_url}{chat}", None),
                (f"{meterline_url}{chat}", key),
            ):
                warm = wrk(wrk_bin, url, connections, 2, auth, work)
            served, runs = served + warm.requests, runs + 1
            think = args.think_ms
            direct = wrk(
                wrk_bin,
                f"{upstream}{chat}",
                connections,
                args.duration,
                PROVIDER_KEY,
                work,
                think_ms=think,
            )
            bare = costed(
                bare_server.pid,
                wrk_bin,
                f"{bare_url}{chat}",
                connections,
                args.duration,
                None,
                work,
                think_ms=think,
            )
            metered = costed(
                meterline.pid,
                wrk_bin,
                f"{meterline_url}{chat}",
                connections,
                args.duration,
                key,
                work,
                think_ms=think,
            )
            served, runs = served + metered.requests, runs + 1
            report_non_streamed(connections, args.duration, think, direct, bare, metered)
        # wrk counts the responses it received; requests still in flight when it stops are
        # answered and recorded all the same, so the ledger may hold up to `connections`
        # more per wrk run — never fewer than served.
        rows = ledger_count(database_url, account_id, served)
        slack = rows - served
        verdict = "OK" if 0 <= slack <= runs * max(args.connections) else "MISMATCH"
        print(
            f"\n  ledger: {rows} rows for {served} responses served "
            f"(+{slack} in flight at wrk's stops) — {verdict}",
            flush=True,
        )
        if args.clients:
            compare_clients(workers, args, wrk_bin, upstream, work, env)
        if args.streams:
            bench_streams(args, database_url, upstream, meterline_url)


def server_cpu_s(pid: int) -> float:
    """CPU seconds the server (and its worker processes) have used so far."""
    process = psutil.Process(pid)
    total = 0.0
    for each in (process, *process.children(recursive=True)):
        times = each.cpu_times()
        total += times.user + times.system
    return total


def costed(
    pid: int,
    binary: str,
    url: str,
    connections: int,
    seconds: int,
    key: str | None,
    work: Path,
    body: str = BODY,
    think_ms: int = 0,
) -> WrkResult:
    """A `wrk` run, with the CPU server `pid` spent per request served during it and how
    its connections were spread over the workers."""
    split: list[int] = []
    port = urlsplit(url).port or 80
    workers = workers_of(psutil.Process(pid))
    sampler = threading.Timer(1.0, lambda: split.extend(connections_held(workers, port)))
    before = server_cpu_s(pid)
    scheduled = [scheduled_s(w.pid) for w in workers]
    sampler.start()
    started = time.monotonic()
    result = wrk(binary, url, connections, seconds, key, work, body, think_ms)
    elapsed = time.monotonic() - started
    result.cpu_us = (server_cpu_s(pid) - before) / max(result.requests, 1) * 1e6
    result.cores = core_time(workers, scheduled, elapsed)
    sampler.join()
    result.split = split
    return result


def bench_routing(
    args: argparse.Namespace, wrk_bin: str, url: str, key: str, work: Path, server: int
) -> None:
    """A model name against a model object of five candidates, alternated `--rounds` times at
    the lowest connection count (which goes first alternates too): the median of each
    round's difference in p50 and in the server's CPU time per request (what routing costs,
    far less sensitive than latency to the other processes on the machine), and the load
    average.

    Once the server is busy (8 connections on a machine of two cores: wrk, the mock and one
    worker share them), a request waits behind the others in its turn, and the p50 is about
    the connections times the server's CPU per request: a µs routing adds shows as about
    8 µs there, and so does any other process's burst. `--connections 1` gives the latency
    a request itself gains."""
    connections = min(args.connections)
    print(
        f"\n-- routing: a model object of {len(CANDIDATES)} candidates vs a model name, "
        f"{connections} connections, {args.duration}s per run, {args.rounds} rounds each"
    )
    for body in (BODY, ROUTED_BODY):
        wrk(wrk_bin, url, connections, 2, key, work, body)
    p50: dict[str, list[float]] = {"name": [], "object": []}
    cpu: dict[str, list[float]] = {"name": [], "object": []}
    runs = (("name", BODY), ("object", ROUTED_BODY))
    for round_ in range(args.rounds):
        # Each first in turn, so a load that rises or falls through the runs favours neither.
        for label, body in runs if round_ % 2 == 0 else runs[::-1]:
            result = costed(server, wrk_bin, url, connections, args.duration, key, work, body)
            assert result.errors == 0, f"{result.errors} errors with the model {label}"
            assert result.cpu_us is not None
            p50[label].append(result.latency_ms["50%"])
            cpu[label].append(result.cpu_us)
            print(
                f"  {label:<7}{fmt(result)}  server CPU {result.cpu_us:4.0f} µs/request"
                f"  load {os.getloadavg()[0]:.2f}",
                flush=True,
            )
    # The machine's speed drifts between runs by more than routing costs: each round's two
    # runs, minutes apart at most, are compared with each other, and the median of those
    # differences is the figure.
    p50_added = median([o - n for o, n in zip(p50["object"], p50["name"], strict=True)])
    cpu_added = median([o - n for o, n in zip(cpu["object"], cpu["name"], strict=True)])
    by_name, by_object = routing_cost()
    print(
        f"  in-process, best of 5 runs of 20,000: a name {by_name:.2f} µs, the object"
        f" {by_object:.2f} µs per request: routing adds {by_object - by_name:.1f} µs"
        f" (load {os.getloadavg()[0]:.2f})",
        flush=True,
    )
    print(
        f"  server CPU per request, medians: name {median(cpu['name']):.0f} µs, object "
        f"{median(cpu['object']):.0f} µs; added by routing, the median of the rounds' "
        f"differences: {cpu_added:+.0f} µs",
        flush=True,
    )
    print(
        f"  p50, medians: name {median(p50['name']):.3f} ms, object {median(p50['object']):.3f}"
        f" ms; added by routing, the median of the rounds' differences: {p50_added:+.3f} ms "
        f"(target ≤ +0.2 ms); load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        flush=True,
    )


def median(values: list[float]) -> float:
    """The middle value (of an even count, the upper of the two middle ones)."""
    return sorted(values)[len(values) // 2]


def routing_cost(repeats: int = 5, calls: int = 20_000) -> tuple[float, float]:
    """Microseconds per request of what routing adds in-process (best of `repeats`): the
    model object read and its 5 candidates filtered, priced and ranked, against a model
    name's provider lookup. CPU time, so far less sensitive to the machine's load than
    wrk's latencies."""
    import orjson

    from pricing.prices import BEGINNING_OF_TIME, Price, PriceBook
    from pricing.rate_cards import Tariff
    from service.providers.config import Provider
    from service.providers.router import ProviderRouter
    from service.routing.schemas import parse_model_spec
    from service.routing.service import ModelRouter
    from service.routing.stats import RoutingStats

    provider = Provider("mock", "http://127.0.0.1:1/v1", ("meta-llama/*",), "inject")
    book = PriceBook(
        Price(c, Decimal(i + 1) / 10, Decimal(i + 1) / 5, BEGINNING_OF_TIME)
        for i, c in enumerate(CANDIDATES)
    )

    class Prices:
        def __init__(self) -> None:
            self.book = book
            self.tariff = Tariff(book)

        async def refresh(self) -> None:
            return None

    stats = RoutingStats()
    router = ModelRouter(ProviderRouter([provider]), Prices(), stats, 3)
    for i, c in enumerate(CANDIDATES):  # every candidate measured, as after warm-up
        stats.observe("mock", c, i == 0, 2.0 + i, 3.0 + i)
    raw = orjson.loads(ROUTED_BODY)["model"]
    account, now = uuid.uuid4(), datetime.now(UTC)

    def per_call(work: Callable[[], object]) -> float:
        best = float("inf")
        for _ in range(repeats):
            # CPU time, not wall time: other processes on a loaded machine do not count.
            start = time.process_time()
            for _ in range(calls):
                work()
            best = min(best, (time.process_time() - start) / calls * 1e6)
        return best

    name = per_call(lambda: router.serving(MODEL))
    routed = per_call(lambda: router.choose(parse_model_spec(raw, 256), account, None, now))
    return name, routed


def report_non_streamed(
    connections: int,
    seconds: int,
    think_ms: int,
    direct: WrkResult,
    bare: WrkResult,
    metered: WrkResult,
) -> None:
    def added(over: WrkResult, q: str) -> float:
        return metered.latency_ms[q] - over.latency_ms[q]

    pace = f", {think_ms} ms between an answer and the next request" if think_ms else ""
    print(f"\n-- non-streamed, {connections} connections{pace}, {seconds}s each")
    print(f"  direct      {fmt(direct)}")
    print(f"  bare proxy  {fmt(bare)}")
    print(f"  Meterline   {fmt(metered)}")
    print(
        f"  Meterline / bare = {metered.rps / bare.rps:.0%}; added over direct: "
        f"p50 {added(direct, '50%'):+.2f} ms, p99 {added(direct, '99%'):+.2f} ms; "
        f"over bare: p50 {added(bare, '50%'):+.2f} ms, p99 {added(bare, '99%'):+.2f} ms",
        flush=True,
    )
    if bare.cpu_us is not None and metered.cpu_us is not None:
        print(
            f"  server CPU per request (its Postgres not counted): bare {bare.cpu_us:.0f} µs, "
            f"Meterline {metered.cpu_us:.0f} µs ({metered.cpu_us - bare.cpu_us:+.0f})",
            flush=True,
        )
    if len(metered.split) > 1:
        print(
            f"  connections per worker: bare {' / '.join(map(str, bare.split))}, "
            f"Meterline {' / '.join(map(str, metered.split))}",
            flush=True,
        )
    for label, result in (("bare", bare), ("Meterline", metered)):
        if result.cores:
            print(f"  {label}: {describe_core_time(result.cores)}", flush=True)


def bench_streams(
    args: argparse.Namespace, database_url: str, upstream: str, meterline_url: str
) -> None:
    stream_account, stream_key = create_key(meterline_url)
    chat = "/v1/chat/completions"
    print(
        f"\n-- streamed: {args.streams} concurrent streams, 50 chunks 20 ms apart, "
        f"{args.stream_seconds}s"
    )
    p99: dict[str, float] = {}
    for label, url, auth in (
        ("direct", f"{upstream}{chat}", PROVIDER_KEY),
        ("Meterline", f"{meterline_url}{chat}", stream_key),
    ):
        result = asyncio.run(stream_load(url, auth, args.streams, args.stream_seconds))
        stalls = sum(1 for g in result.max_gap_ms if g > 200)
        p99[label] = result.pct(result.ttft_ms, 0.99)
        print(
            f"  {label:<10} {result.completed} streams ({result.failed} failed): "
            f"TTFT p50 {result.pct(result.ttft_ms, 0.5):6.2f} ms  p99 {p99[label]:6.2f} ms  "
            f"max {max(result.ttft_ms, default=0):6.1f} ms; worst gap between chunks "
            f"p99 {result.pct(result.max_gap_ms, 0.99):6.1f} ms; streams with a >200 ms "
            f"stall: {stalls}",
            flush=True,
        )
        if label == "Meterline":
            rows = ledger_count(database_url, stream_account, result.completed)
            verdict = "OK" if rows == result.completed + result.failed else "MISMATCH"
            print(
                f"  ledger: {rows} rows for {result.completed} completed streams "
                f"({result.failed} failed) — {verdict}",
                flush=True,
            )
    print(f"  added TTFT p99: {p99['Meterline'] - p99['direct']:+.2f} ms", flush=True)


def compare_clients(
    workers: int,
    args: argparse.Namespace,
    wrk_bin: str,
    upstream: str,
    work: Path,
    env: dict[str, str],
) -> None:
    """The bare pass-through with each HTTP client: why Meterline uses aiohttp's."""
    print(f"\n-- bare pass-through by HTTP client, 64 connections, {args.duration}s")
    for client in ("aiohttp", "httpx-aiohttp", "httpx"):
        port = free_port()
        uvicorn = [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "--loop",
            "uvloop",
            "--http",
            "httptools",
            "--log-level",
            "warning",
            "--workers",
            str(workers),
            "--port",
            str(port),
            "bench.passthrough:create_app",
        ]
        with run(
            uvicorn,
            f"http://127.0.0.1:{port}/v1/chat/completions",
            {**env, "BENCH_CLIENT": client},
            work / f"bare-{client}.log",
        ):
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            wrk(wrk_bin, url, 64, 2, None, work)
            print(
                f"  {client:<14}{fmt(wrk(wrk_bin, url, 64, args.duration, None, work))}", flush=True
            )


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench proxy", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[1], help="worker counts to run")
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, nargs="+", default=[8, 64])
    parser.add_argument(
        "--think-ms",
        type=int,
        default=0,
        help="each connection's wait between an answer and its next request (0: none)",
    )
    parser.add_argument("--streams", type=int, default=500, help="concurrent streams (0: skip)")
    parser.add_argument("--stream-seconds", type=float, default=8.0)
    parser.add_argument("--clients", action="store_true", help="also compare HTTP clients")
    parser.add_argument(
        "--routing",
        action="store_true",
        help="only compare a model object of 5 candidates with a model name",
    )
    parser.add_argument("--rounds", type=int, default=3, help="--routing: runs of each")
    args = parser.parse_args(argv)
    wrk_bin = ensure_wrk()
    work = Path(tempfile.mkdtemp(prefix="meterline-bench-"))
    print(f"logs in {work}; {os.cpu_count()} CPUs", flush=True)
    with bench_database() as database_url:
        port = free_port()
        upstream = f"http://127.0.0.1:{port}"
        with run(
            [
                sys.executable,
                "-m",
                "service",
                "mock-upstream",
                "--port",
                str(port),
                "--api-key",
                PROVIDER_KEY,
            ],
            f"{upstream}/v1/models",
            {},
            work / "mock.log",
        ):
            for workers in args.workers:
                bench_workers(workers, args, wrk_bin, database_url, upstream, work)
