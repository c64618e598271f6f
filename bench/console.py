"""`python -m bench console`: the console's overview over a month of 1,000,000 ledger rows,
measured in a real headless Chromium (Debian's `chromium`, installed if missing).

Creates a database of its own on `METERLINE_DATABASE_URL` (default
postgresql://postgres@127.0.0.1:5432/test), COPYs the rows into the current UTC month with
`bench.export`'s loader (spread over `--accounts` accounts with `--keys` keys each and
`--models` models), folds them into the daily usage rollup as the server's job does, starts
`meterline serve` and signs in as the operator. Each run opens the overview in a fresh
browser context (an empty cache) and reports the bytes transferred (HTML, CSS, JavaScript:
every response's `transferSize`) and the time from navigation start until the daily-spend
chart is on the screen (it is drawn on the server, so that is the page's first contentful
paint; a chart drawn by script would be its `performance.mark`), against the targets:
< 300 KB, < 300 ms. Then the same with the browser's cache warm, and again right after
`--tail-rows` more rows arrived (not yet folded: read from the ledger). The server's share
is also timed in this process, with the rollup read afresh (a worker's first view of it)
and held (a reload).

    python -m bench console [--rows 1000000] [--accounts 100] [--keys 3] [--models 8]
                            [--runs 5] [--tail-rows 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from statistics import median
from typing import Any

from bench.export import _populate
from bench.support import bench_database, free_port, run
from pricing.invoice import BillingPeriod
from service.auth.principal import ADMIN
from service.console.service import overview
from service.db.engine import asyncpg_dsn, create_engine, session_factory, transaction
from service.usage.cache import BreakdownCache
from service.usage.rollup import roll_up_daily

ADMIN_TOKEN = "bench-admin-" + secrets.token_hex(8)
TARGET_BYTES = 300_000
TARGET_MS = 300.0
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
MEASURE = """() => {
    const nav = performance.getEntriesByType("navigation")[0];
    const resources = performance.getEntriesByType("resource");
    // The overview's chart is drawn on the server: it is on the page's first paint.
    const drawn = performance.getEntriesByName("meterline:chart-drawn")[0]
        || performance.getEntriesByName("first-contentful-paint")[0]
        || performance.getEntriesByName("meterline:chart-painted")[0];
    return {
        bytes: nav.transferSize + resources.reduce((sum, r) => sum + r.transferSize, 0),
        decoded: nav.decodedBodySize + resources.reduce((sum, r) => sum + r.decodedBodySize, 0),
        files: 1 + resources.length,
        html_ms: nav.responseEnd - nav.requestStart,
        // Where a view's time goes, each from navigation start: the request sent, the HTML
        // received, the last static file received, the DOM ready.
        request_ms: nav.requestStart,
        html_end_ms: nav.responseEnd,
        files_end_ms: resources.reduce((end, r) => Math.max(end, r.responseEnd), 0),
        dom_ms: nav.domContentLoadedEventEnd,
        paint_ms: (performance.getEntriesByName("first-contentful-paint")[0] || {}).startTime,
        frame_ms: (performance.getEntriesByName("meterline:chart-painted")[0] || {}).startTime,
        drawn_ms: drawn ? drawn.startTime : null,
        load_ms: nav.loadEventEnd,
    };
}"""


# Whether the chart's time is known yet: drawn by script, or painted with the page.
PAINTED = """() => ["meterline:chart-drawn", "first-contentful-paint", "meterline:chart-painted"]
    .some(name => performance.getEntriesByName(name).length > 0)"""


def ensure_chromium() -> None:
    if shutil.which("chromium") or Path(CHROMIUM).exists():
        return
    print("chromium not found: installing Debian's package with apt-get", flush=True)
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=True)


async def _fold(url: str) -> tuple[int, float]:
    engine = create_engine(url, pool_size=1)
    began = time.perf_counter()
    try:
        async with transaction(session_factory(engine)) as session:
            rows = await roll_up_daily(session, wait=True) or 0
        return rows, time.perf_counter() - began
    finally:
        await engine.dispose()


def _visit(browser: Any, base: str, cookies: list[Any] | None = None) -> dict[str, Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    if cookies:
        context.add_cookies(cookies)
    page = context.new_page()
    if not cookies:
        page.goto(f"{base}/console/sign-in")
        page.fill("input[name=credential]", ADMIN_TOKEN)
        page.click("button[type=submit]")
        page.wait_for_url(f"{base}/console")
        cookies = context.cookies()
        context.close()
        return {"cookies": cookies}
    page.goto(f"{base}/console")
    page.wait_for_selector("#daily-chart[data-drawn]")
    page.wait_for_load_state("load")
    page.wait_for_function(PAINTED)
    result: dict[str, Any] = page.evaluate(MEASURE)
    result["warm"] = _warm(page, base)
    context.close()
    return result


def _warm(page: Any, base: str) -> dict[str, Any]:
    """The same page again in the same context: static files from the browser's cache."""
    page.goto(f"{base}/console")
    page.wait_for_selector("#daily-chart[data-drawn]")
    page.wait_for_load_state("load")
    page.wait_for_function(PAINTED)
    warm: dict[str, Any] = page.evaluate(MEASURE)
    return warm


def _report(label: str, runs: list[dict[str, Any]]) -> None:
    drawn = [r["drawn_ms"] for r in runs]
    size = max(r["bytes"] for r in runs)
    print(
        f"{label}: chart drawn after median {median(drawn):.0f} ms (best {min(drawn):.0f},"
        f" worst {max(drawn):.0f}); HTML in {median(r['html_ms'] for r in runs):.0f} ms;"
        f" {size / 1000:.1f} KB transferred ({runs[0]['decoded'] / 1000:.1f} KB decoded,"
        f" {runs[0]['files']} files)"
    )
    phases = ("request_ms", "html_end_ms", "files_end_ms", "dom_ms", "paint_ms", "frame_ms")
    print(
        "  medians from navigation start: "
        + ", ".join(
            f"{name.removesuffix('_ms')} {median(r[name] for r in runs):.0f} ms"
            for name in phases
            if all(r.get(name) is not None for r in runs)
        )
    )


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench console", description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--accounts", type=int, default=100)
    parser.add_argument("--keys", type=int, default=3, help="Keys per account.")
    parser.add_argument("--models", type=int, default=8)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tail-rows", type=int, default=20_000)
    args = parser.parse_args(argv)
    ensure_chromium()
    from playwright.sync_api import sync_playwright

    start = BillingPeriod.of(datetime.now(UTC)).start
    with bench_database() as url, tempfile.TemporaryDirectory() as tmp:
        began = time.perf_counter()
        asyncio.run(
            _populate(asyncpg_dsn(url), args.rows, args.accounts, args.models, start, args.keys)
        )
        print(
            f"loaded {args.rows:,} ledger rows for {start:%Y-%m} ({args.accounts} accounts,"
            f" {args.accounts * args.keys} keys, {args.models} models)"
            f" in {time.perf_counter() - began:.1f}s"
        )
        folded, seconds = asyncio.run(_fold(url))
        print(f"daily rollup: folded {folded:,} rows in {seconds:.1f}s")
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        env = {
            "METERLINE_DATABASE_URL": url,
            "METERLINE_ADMIN_TOKEN": ADMIN_TOKEN,
            "METERLINE_DATA_DIR": tmp,
            # Folds are run by this benchmark, when it means to.
            "METERLINE_USAGE_ROLLUP_INTERVAL_S": "0",
        }
        os.environ.pop("METERLINE_PROVIDERS", None)
        serve = [sys.executable, "-m", "service", "serve", "--port", str(port), "--workers", "1"]
        with run(serve, f"{base}/healthz", env, Path(tmp) / "serve.log"):
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                cookies = _visit(browser, base)["cookies"]
                _visit(browser, base, cookies)  # the server's first query plans and caches
                cold = [_visit(browser, base, cookies) for _ in range(args.runs)]
                _report("overview, empty browser cache", cold)
                _report("overview, warm browser cache", [r["warm"] for r in cold])
                browser.close()
            fresh, held = asyncio.run(_server_times(url, args.runs))
            print(
                f"server: the overview's figures in median {fresh:.0f} ms read afresh from the"
                f" rollup (a worker's first view of them), {held:.0f} ms beside the rollup held"
            )
            asyncio.run(_tail(url, args, start))
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                tail = [_visit(browser, base, cookies) for _ in range(args.runs)]
                _report(f"overview with {args.tail_rows:,} rows not yet folded", tail)
                _report(
                    f"overview with {args.tail_rows:,} rows not yet folded, warm browser cache",
                    [r["warm"] for r in tail],
                )
                browser.close()
            fresh, held = asyncio.run(_server_times(url, args.runs))
            print(
                f"server, {args.tail_rows:,} rows not yet folded: median {fresh:.0f} ms read"
                f" afresh, {held:.0f} ms beside the rollup held"
            )
    best = cold
    size = max(r["bytes"] for r in best)
    drawn = median(r["drawn_ms"] for r in best)
    print(
        f"load average during the run: {os.getloadavg()[0]:.1f} (1 min) on {os.cpu_count()} cores"
    )
    print(
        f"\ntargets: < {TARGET_BYTES // 1000} KB → {size / 1000:.1f} KB"
        f" {'ok' if size < TARGET_BYTES else 'MISSED'};"
        f" < {TARGET_MS:.0f} ms → {drawn:.0f} ms {'ok' if drawn < TARGET_MS else 'MISSED'}"
    )


async def _server_times(url: str, runs: int) -> tuple[float, float]:
    """The overview's figures as the operator's page asks for them, timed in this process:
    read afresh (a new cache each time: what a worker pays once per rollup it has not
    seen), and beside the rollup held (what a reload pays)."""
    engine = create_engine(url, pool_size=1)
    held = BreakdownCache()
    timings: dict[str, list[float]] = {"fresh": [], "held": []}
    try:
        for _ in range(runs):
            for name, cache in (("fresh", BreakdownCache()), ("held", held)):
                async with session_factory(engine)() as session:
                    began = time.perf_counter()
                    await overview(session, ADMIN, datetime.now(UTC), cache)
                    timings[name].append((time.perf_counter() - began) * 1000)
    finally:
        await engine.dispose()
    return median(timings["fresh"]), median(timings["held"])


async def _tail(url: str, args: argparse.Namespace, start: datetime) -> None:
    """More rows recorded after the fold, as between two rounds of the rollup job."""
    import asyncpg

    from bench.export import LEDGER_COLUMNS, _ledger_rows

    connection = await asyncpg.connect(asyncpg_dsn(url))
    try:
        accounts = [r["id"] for r in await connection.fetch("SELECT id FROM accounts")]
        models = [f"bench-model-{m}" for m in range(args.models)]
        rows = [
            (f"req_tail_{i:010d}", *record[1:])
            for i, record in enumerate(_ledger_rows(args.tail_rows, start, accounts, models, []))
        ]
        await connection.copy_records_to_table("usage_ledger", records=rows, columns=LEDGER_COLUMNS)
    finally:
        await connection.close()
