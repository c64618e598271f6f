"""Feed the metrics from the running parts: each finished request, and the ledger writer.

Requests are counted by a settlement hook of the proxy (one call per ledger record, after
the response is sent) and flushed to the exported values every second, when each worker
also samples the writer's queue, spool and row counts.

What is read of the writer and of a record is declared here (protocols), so the metrics
import neither: the ledger and the proxy feed the registry, and a cycle would close.
"""

from __future__ import annotations

import logging
import os
import time
from decimal import Decimal
from typing import Any, Protocol

from service.lifecycle import Periodic
from service.metrics import registry

log = logging.getLogger("meterline.metrics")

_EVERY_S = 1.0
_LAG_EVERY_S = 0.1


class WriterStats(Protocol):
    @property
    def queue_depth(self) -> int: ...

    @property
    def journal_errors(self) -> int: ...

    records_written: int
    records_spooled: int
    records_replayed: int
    records_quarantined: int
    spool_errors: int
    flush_errors: int
    spool_files: int
    spool_bytes: int


class FinishedRequest(Protocol):
    """What the metrics read of a request's final ledger record (`LedgerRecord`)."""

    @property
    def endpoint(self) -> str: ...
    @property
    def requested_model(self) -> str: ...
    @property
    def status_code(self) -> int: ...
    @property
    def provider(self) -> str | None: ...
    @property
    def prompt_tokens(self) -> int: ...
    @property
    def completion_tokens(self) -> int: ...
    @property
    def cached_tokens(self) -> int: ...
    @property
    def reasoning_tokens(self) -> int: ...
    @property
    def cost_usd(self) -> Decimal | None: ...
    @property
    def latency_ms(self) -> int | None: ...
    @property
    def ttft_ms(self) -> int | None: ...


async def observe_settlement(
    ctx: object, record: FinishedRequest | None, _held: object = None
) -> None:
    """A proxy settlement hook: count the request from its final ledger record."""
    if record is None:
        return
    registry.observe_request(
        endpoint=record.endpoint,
        model=record.requested_model,
        status=record.status_code,
        provider=record.provider,
        prompt_tokens=record.prompt_tokens,
        completion_tokens=record.completion_tokens,
        cached_tokens=record.cached_tokens,
        reasoning_tokens=record.reasoning_tokens,
        cost_usd=record.cost_usd,
        latency_ms=record.latency_ms,
        ttft_ms=record.ttft_ms,
    )


class LoopLagProbe:
    """Times a round due every `_LAG_EVERY_S`: how late it runs is how long the loop was
    busy with something else (a stall of the loop holds every request of the worker)."""

    def __init__(self) -> None:
        self._due: float | None = None
        self.periodic = Periodic("event_loop_lag", _LAG_EVERY_S, self._probe, log)

    async def _probe(self) -> None:
        now = time.perf_counter()
        if self._due is not None:
            registry.EVENT_LOOP_LAG.observe(max(0.0, now - self._due))
        self._due = now + _LAG_EVERY_S


class LedgerSampler:
    def __init__(self, writer: WriterStats) -> None:
        self._writer = writer
        self._seen: dict[tuple[Any, str], int] = {}
        self._sampler = Periodic("metrics_sample", _EVERY_S, self._sample_async, log)
        self._lag = LoopLagProbe().periodic

    def sample(self) -> None:
        registry.flush()
        writer = self._writer
        registry.QUEUE_DEPTH.set(writer.queue_depth)
        registry.SPOOL_FILES.set(writer.spool_files)
        registry.SPOOL_BYTES.set(writer.spool_bytes)
        for counter, label, total in (
            (registry.LEDGER_ROWS, "written", writer.records_written),
            (registry.LEDGER_ROWS, "spooled", writer.records_spooled),
            (registry.LEDGER_ROWS, "replayed", writer.records_replayed),
            (registry.LEDGER_ROWS, "quarantined", writer.records_quarantined),
            (registry.LEDGER_ERRORS, "journal", writer.journal_errors),
            (registry.LEDGER_ERRORS, "spool", writer.spool_errors),
            (registry.LEDGER_ERRORS, "flush", writer.flush_errors),
        ):
            seen = self._seen.get((counter, label), 0)
            if total > seen:
                counter.labels(label).inc(total - seen)
                self._seen[(counter, label)] = total

    async def _sample_async(self) -> None:
        self.sample()

    async def start(self) -> None:
        self.sample()
        self._sampler.start()
        self._lag.start()

    async def stop(self) -> None:
        await self._lag.stop()
        await self._sampler.stop()
        self.sample()
        registry.process_exited(os.getpid())
