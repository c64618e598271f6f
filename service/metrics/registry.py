"""Every metric Meterline exports, and the small functions that feed them.

`meterline serve --workers N` runs N processes; Prometheus must see their sum. The CLI
points `PROMETHEUS_MULTIPROC_DIR` at a folder of the data directory before the workers
start, so each process writes its values to memory-mapped files there and `/metrics`
(answered by whichever worker) merges them. Without that variable (a lone process, the
tests' in-process apps) the ordinary in-memory registry is used.

Labels stay bounded: a model name comes from the client, so past `_MODEL_LABELS`
distinct names the rest are counted as `other`.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)

# prometheus_client reads this variable itself, at import; reading it here too keeps the
# exporter consistent with how the values above were stored.
MULTIPROC_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR")


def _process_id() -> Callable[[], int]:
    """This process's id, read again only in the child of a fork.

    A multiprocess value asks for the process id on every change, to notice a fork and move
    to files of its own: a getpid(2) each time, a quarter of the cost of an `inc`, and a
    proxied request changes about ten values. The workers are spawned, not forked; a fork
    (os.fork, multiprocessing's fork start method) still gets its own id, and so its own
    files, through `os.register_at_fork`."""
    current = os.getpid()

    def after_fork() -> None:
        nonlocal current
        current = os.getpid()

    os.register_at_fork(after_in_child=after_fork)
    return lambda: current


if MULTIPROC_DIR:
    multiprocess_value: Any = values.MultiProcessValue  # prometheus_client has no annotations
    values.ValueClass = multiprocess_value(process_identifier=_process_id())

_MODEL_LABELS = 200
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_BATCH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

REQUESTS = Counter(
    "meterline_requests",
    "Proxied requests by endpoint, model and HTTP status (one per ledger record).",
    ["endpoint", "model", "status"],
)
TOKENS = Counter(
    "meterline_tokens",
    "Tokens of proxied requests by model and kind (prompt, completion, cached, reasoning).",
    ["model", "kind"],
)
COST = Counter(
    "meterline_cost_usd",
    "Cost of proxied requests at list price, by model (approximate: the ledger is exact).",
    ["model"],
)
UPSTREAM_LATENCY = Histogram(
    "meterline_upstream_latency_seconds",
    "Time from forwarding a request to its last byte, by provider.",
    ["provider"],
    buckets=_LATENCY_BUCKETS,
)
TIME_TO_FIRST_TOKEN = Histogram(
    "meterline_time_to_first_token_seconds",
    "Time from forwarding a streamed request to its first chunk, by provider.",
    ["provider"],
    buckets=_LATENCY_BUCKETS,
)
QUEUE_DEPTH = Gauge(
    "meterline_ledger_queue_depth",
    "Usage records waiting in memory for the ledger writer.",
    multiprocess_mode="livesum",
)
# Every worker measures the one spool folder they share: the largest reading is the size.
SPOOL_FILES = Gauge(
    "meterline_ledger_spool_files",
    "Batches of usage records in the durable spool, waiting for Postgres.",
    multiprocess_mode="livemax",
)
SPOOL_BYTES = Gauge(
    "meterline_ledger_spool_bytes",
    "Size of the durable spool on disk.",
    multiprocess_mode="livemax",
)
BATCH_SECONDS = Histogram(
    "meterline_ledger_batch_seconds",
    "Time to write one batch of usage records into Postgres.",
    buckets=_BATCH_BUCKETS,
)
LEDGER_ROWS = Counter(
    "meterline_ledger_rows",
    "Usage records by where they went: written to Postgres, spooled, replayed from the spool,"
    " quarantined (refused by Postgres for their content; GET /billing/reports/quarantine).",
    ["outcome"],
)
LEDGER_ERRORS = Counter(
    "meterline_ledger_errors",
    "Failures of the ledger writer's durable paths, retried: a journal segment or write"
    " (journal), a spool file (spool), a flush (flush).",
    ["step"],
)
# A stall of the event loop delays every request of the worker at once: the probe's timer
# fires late by that much (service/metrics/sampler.py).
EVENT_LOOP_LAG = Histogram(
    "meterline_event_loop_lag_seconds",
    "How late the event loop ran a timer due every 0.1 s (a stall shows as a large value).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
LIMIT_REFUSALS = Counter(
    "meterline_limit_refusals",
    "Requests refused by kind of limit (requests, tokens, budget: 429; credits: 402).",
    ["kind"],
)
LIMIT_ERRORS = Counter(
    "meterline_limit_store_errors",
    "Failures of the rate-limit and budget counter store (requests then pass unlimited).",
    ["step"],
)

_models: set[str] = set()


def model_label(model: str | None) -> str:
    if not model:
        return "unknown"
    if model in _models:
        return model
    if len(_models) < _MODEL_LABELS:
        _models.add(model)
        return model
    return "other"


# Counts of finished requests gather here and reach Prometheus' values once a second
# (`flush`, from the sampler): a dict update per request instead of several writes to
# the memory-mapped files of the multiprocess mode.
_requests: dict[tuple[str, str, str], int] = defaultdict(int)
_tokens: dict[tuple[str, str], int] = defaultdict(int)
_cost: dict[str, Decimal] = defaultdict(Decimal)
_latency: dict[str, Any] = {}
_first_token: dict[str, Any] = {}


def observe_request(
    *,
    endpoint: str,
    model: str | None,
    status: int,
    provider: str | None,
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int = 0,
    reasoning_tokens: int = 0,
    cost_usd: Decimal | None = None,
    latency_ms: int | None = None,
    ttft_ms: int | None = None,
) -> None:
    """Count one finished request from its ledger record."""
    label = model_label(model)
    _requests[(endpoint, label, str(status))] += 1
    for kind, count in (
        ("prompt", prompt_tokens),
        ("completion", completion_tokens),
        ("cached", cached_tokens),
        ("reasoning", reasoning_tokens),
    ):
        if count > 0:
            _tokens[(label, kind)] += count
    if cost_usd is not None and cost_usd > 0:
        _cost[label] += cost_usd
    name = provider or "none"
    if latency_ms is not None:
        histogram = _latency.get(name) or _latency.setdefault(name, UPSTREAM_LATENCY.labels(name))
        histogram.observe(latency_ms / 1000)
    if ttft_ms is not None:
        histogram = _first_token.get(name) or _first_token.setdefault(
            name, TIME_TO_FIRST_TOKEN.labels(name)
        )
        histogram.observe(ttft_ms / 1000)


def flush() -> None:
    """Move the gathered request counts into the exported values."""
    for labels, count in list(_requests.items()):
        REQUESTS.labels(*labels).inc(count)
    _requests.clear()
    for (model, kind), count in list(_tokens.items()):
        TOKENS.labels(model, kind).inc(count)
    _tokens.clear()
    for model, amount in list(_cost.items()):
        # Prometheus samples are floats; the exact amount is the ledger's.
        COST.labels(model).inc(float(amount))
    _cost.clear()


def exposition() -> bytes:
    """The text Prometheus scrapes: this process's metrics, or every worker's summed."""
    if MULTIPROC_DIR:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, MULTIPROC_DIR)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest(REGISTRY)


def process_exited(pid: int) -> None:
    """Drop the live gauges of a worker that stopped, so its queue is not summed forever."""
    if MULTIPROC_DIR:
        multiprocess.mark_process_dead(pid, MULTIPROC_DIR)  # type: ignore[no-untyped-call]
