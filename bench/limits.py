"""`python -m bench limits`: what rate limits and budgets cost on the proxy's hot path.

Starts the mock provider and `meterline serve` (ledger on Postgres, as in `bench proxy`),
once with counters in the process and once in Redis (`METERLINE_REDIS_URL`, default
redis://127.0.0.1:6379/0, under a prefix of its own), and drives each with `wrk`, the
same request, for four accounts: no limits at all; a rate limit (requests and tokens per
minute, never reached); a rate limit and a monthly budget (never reached), postpaid; the
same, prepaid, with credit it never runs out of (its balance is one more budget). Prints req/s
and latency percentiles of each (the median of interleaved rounds), and their ratio to
the unlimited account.

    python -m bench limits [--workers 1] [--connections 64] [--duration 5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import secrets
import sys
import tempfile
from pathlib import Path

import httpx
import redis

from bench.proxy import ADMIN_TOKEN, PROVIDER_KEY, WrkResult, fmt, wrk
from bench.support import bench_database, ensure_wrk, free_port, run

HUGE = 1_000_000_000
ACCOUNTS: dict[str, dict[str, object]] = {
    "no limits": {"tier": "custom"},
    "rate limits": {"tier": "custom", "rate_limit_rpm": HUGE, "rate_limit_tpm": HUGE},
    "limits + budget": {
        "tier": "custom",
        "rate_limit_rpm": HUGE,
        "rate_limit_tpm": HUGE,
        "monthly_budget_usd": "1000000",
    },
    "prepaid + budget": {
        "tier": "custom",
        "rate_limit_rpm": HUGE,
        "rate_limit_tpm": HUGE,
        "monthly_budget_usd": "1000000",
        "billing_mode": "prepaid",
    },
}
# Credit put on each prepaid account: never used up in a run.
CREDIT_USD = "1000000"


def create_keys(base: str) -> dict[str, str]:
    keys = {}
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as c:
        for name, fields in ACCOUNTS.items():
            account = c.post("/billing/accounts", json={"name": f"bench {name}", **fields})
            account.raise_for_status()
            if fields.get("billing_mode") == "prepaid":
                c.post(
                    f"/billing/accounts/{account.json()['id']}/credits",
                    json={"amount_usd": CREDIT_USD, "kind": "grant"},
                ).raise_for_status()
            key = c.post(f"/billing/accounts/{account.json()['id']}/keys", json={})
            key.raise_for_status()
            keys[name] = str(key.json()["key"])
    return keys


def bench_store(
    store: str, args: argparse.Namespace, wrk_bin: str, upstream: str, work: Path, db: str
) -> None:
    providers = work / "providers.yaml"
    providers.write_text(
        "providers:\n  - name: mock\n"
        f"    base_url: {upstream}/v1\n"
        "    api_key_env: BENCH_PROVIDER_KEY\n"
        "    models: ['mock-*', 'meta-llama/*']\n"
        "    stream_usage: inject\n"
    )
    prefix = f"meterline-bench-{secrets.token_hex(4)}:"
    env = {
        "METERLINE_DATABASE_URL": db,
        "METERLINE_ADMIN_TOKEN": ADMIN_TOKEN,
        "METERLINE_PROVIDERS": str(providers),
        "METERLINE_DATA_DIR": str(work / f"data-{store}"),
        "METERLINE_LOG_LEVEL": "warning",
        "BENCH_PROVIDER_KEY": PROVIDER_KEY,
    }
    if store == "redis":
        env |= {"METERLINE_REDIS_URL": args.redis_url, "METERLINE_REDIS_PREFIX": prefix}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "service", "serve", "--port", str(port)]
    try:
        with run(
            [*command, "--workers", str(args.workers)],
            f"{url}/healthz",
            env,
            work / f"meterline-{store}.log",
        ):
            keys = create_keys(url)
            chat = f"{url}/v1/chat/completions"
            for key in keys.values():  # warm caches and pools
                wrk(wrk_bin, chat, args.connections, 2, key, work)
            # Interleaved rounds, the median kept: the machine's other load hits all alike.
            rounds: dict[str, list[WrkResult]] = {name: [] for name in keys}
            for _ in range(args.rounds):
                for name, key in keys.items():
                    rounds[name].append(
                        wrk(wrk_bin, chat, args.connections, args.duration, key, work)
                    )
            results = {
                name: sorted(runs, key=lambda r: r.rps)[len(runs) // 2]
                for name, runs in rounds.items()
            }
    finally:
        if store == "redis":
            client = redis.Redis.from_url(args.redis_url)
            stale = list(client.scan_iter(match=f"{prefix}*"))
            if stale:
                client.delete(*stale)
            client.close()
    base = results["no limits"]
    print(
        f"\n-- counters {store}, {args.workers} worker(s), {args.connections} connections, "
        f"median of {args.rounds} x {args.duration}s"
    )
    for name, result in results.items():
        ratio = result.rps / base.rps if base.rps else 0.0
        print(f"  {name:<16} {fmt(result)}  ({ratio:.0%} of no limits)", flush=True)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench limits")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--stores", nargs="+", default=["memory", "redis"])
    args = parser.parse_args(argv)
    wrk_bin = ensure_wrk()
    with tempfile.TemporaryDirectory(prefix="meterline-bench-limits-") as tmp:
        work = Path(tmp)
        upstream_port = free_port()
        upstream = f"http://127.0.0.1:{upstream_port}"
        with (
            bench_database() as db,
            run(
                [
                    sys.executable,
                    "-m",
                    "service",
                    "mock-upstream",
                    "--port",
                    str(upstream_port),
                    "--api-key",
                    PROVIDER_KEY,
                ],
                f"{upstream}/v1/models",
                {},
                work / "upstream.log",
            ),
        ):
            for store in args.stores:
                bench_store(store, args, wrk_bin, upstream, work, db)
