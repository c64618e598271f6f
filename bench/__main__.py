"""`python -m bench <name> [args…]`: run one benchmark. `python -m bench` lists them.

Each benchmark is a module of this package with a `main(argv: list[str]) -> None`;
registering one is one line in BENCHMARKS.
"""

from __future__ import annotations

import importlib
import sys

BENCHMARKS: dict[str, str] = {
    "proxy": "bench.proxy",  # throughput, latency and TTFT: direct vs through Meterline
    "streams": "bench.streams",  # N streams held in flight, with the shared node tools
    "ingest": "bench.ingest",  # ledger writer: usage rows/s into Postgres
    "quotes": "bench.quotes",  # history quote latency from 100,000 past tasks
    "export": "bench.export",  # monthly report (or --raw rows) of 1M ledger rows: rows/s, peak RSS
    "invoices": "bench.invoices",  # every account's invoice for a month of 5M ledger rows
    "limits": "bench.limits",  # cost of rate limits and budgets, in process vs Redis
    "console": "bench.console",  # the console's overview over 1M ledger rows, in Chromium
}


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in BENCHMARKS:
        print("usage: python -m bench <name> [args…]\n\nbenchmarks:")
        for name, path in BENCHMARKS.items():
            print(f"  {name:<10} {path}")
        raise SystemExit(0 if not argv else 2)
    module = importlib.import_module(BENCHMARKS[argv[0]])
    module.main(argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
