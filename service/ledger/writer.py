"""The ledger writer: records leave the response path through memory and reach Postgres in batches.

`submit` is all a request does: the record's JSON line is appended to the journal and to
an in-memory queue; that line is all the rest of the path handles (the batch insert,
the spool, the replay). A background task takes batches of up
to `batch_size` records, at least every `flush_interval` seconds, and inserts each in one
idempotent statement. When Postgres fails, the batch goes to the durable spool instead and
the server keeps serving; a second task replays spooled batches once Postgres answers
again. Start-up replays what a crash left; `close` (graceful shutdown) writes or spools
everything still in memory.

A row Postgres refuses for its content never takes its neighbours with it: the batch is
stored row by row and only the refused rows are quarantined (`LedgerRepository.store`),
live and in replays alike. When neither Postgres nor the spool takes a batch, its rows go
back to the queue and the journal segments holding them are kept: a record leaves the
journal only once it is in Postgres or in a spool file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from pathlib import Path

import asyncpg

from pricing.invoice import BillingPeriod
from service.ledger.journal import Journal
from service.ledger.record import BatchSource, LedgerRecord, months_of
from service.ledger.repository import BAD_DATA, LedgerRepository, Stored
from service.ledger.spool import Spool
from service.lifecycle import Periodic
from service.metrics import registry as metrics

log = logging.getLogger("meterline.ledger")

# After a failure, batches go straight to the spool for this long instead of each waiting
# for a connection attempt; the replay loop probes the database meanwhile. A spool that
# failed is tried again after as long, and so is a flush that could store nothing.
_RETRY_AFTER_S = 1.0
_REPLAY_EVERY_S = 0.5
_ORPHANS_EVERY_S = 30.0
_STATEMENT_TIMEOUT_S = 30.0
# Batches written at once: one is encoded here while Postgres stores the other.
_CONCURRENT_WRITES = 2


class LedgerWriter:
    def __init__(
        self,
        dsn: str,
        spool_dir: Path,
        batch_size: int = 100,
        flush_interval_s: float = 0.2,
        queue_max: int = 200_000,
    ) -> None:
        self._dsn = dsn
        self.spool = Spool(spool_dir)
        self.journal = Journal(spool_dir / "journal")
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.queue_max = queue_max
        self._queue: deque[bytes] = deque()  # records as JSON lines
        self._months: set[BillingPeriod] = set()  # partition months submitted
        self._repository = LedgerRepository()
        self._pool: asyncpg.Pool | None = None
        self._down_until = 0.0
        self._spool_down_until = 0.0
        self._flusher = Periodic("ledger_flush", flush_interval_s, self._flush_round, log)
        self._replayer = Periodic("spool_replay", _REPLAY_EVERY_S, self._replay_round, log)
        self._orphans_checked = time.monotonic()
        self._spilling: set[asyncio.Task[None]] = set()
        self._writing: set[asyncio.Task[None]] = set()
        # Journal segments whose records are not all durable yet; and how many times rows
        # went back to the queue (a flush that saw it move must keep its segments).
        self._held: list[Path] = []
        self._durable: list[Path] = []  # segments to delete whose deletion failed once
        self._requeues = 0
        self._closing = False
        # Read by /metrics.
        self.records_written = 0
        self.records_spooled = 0
        self.records_replayed = 0
        self.records_quarantined = 0
        self.records_kept_in_journal = 0  # at shutdown, with Postgres and the spool failing
        self.spool_errors = 0
        self.flush_errors = 0
        self.spool_files = 0
        self.spool_bytes = 0

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def database_ok(self) -> bool:
        return time.monotonic() >= self._down_until

    @property
    def journal_errors(self) -> int:
        return self.journal.errors

    def submit(self, record: LedgerRecord) -> None:
        """Hand a record over; never blocks, never fails, never touches the database."""
        line = record.to_json()
        self.journal.append(line)  # survives a killed process from here on
        self._months.add(BillingPeriod.of(record.occurred_at))
        queue = self._queue
        queue.append(line)
        if len(queue) >= self.batch_size:
            self._flusher.wake()
            if len(queue) >= self.queue_max and time.monotonic() >= self._spool_down_until:
                self._spill()

    def _spill(self) -> None:
        # The writer cannot keep up (or Postgres is down and the disk is slow): move the
        # backlog to the spool rather than grow without bound or drop anything.
        batch = list(self._queue)
        self._queue.clear()
        task = asyncio.create_task(self._spill_batch(batch))
        self._spilling.add(task)
        task.add_done_callback(self._spilling.discard)

    async def _spill_batch(self, batch: list[bytes]) -> None:
        if not await self._spool(batch):
            self._requeue(batch)

    async def start(self) -> None:
        await asyncio.to_thread(self.journal.recover_into, self.spool.directory, True)
        self.journal.open()  # a failure is logged and counted; records then go to memory
        await asyncio.to_thread(self.spool.recover_orphans, True)
        await asyncio.to_thread(self.spool.requeue_rejected)
        self._update_spool_stats()
        with contextlib.suppress(Exception):
            await self._connect()
        if self.spool_files:
            log.info("event=spool_replay_at_start files=%d", self.spool_files)
            await self._replay_all()
        self._orphans_checked = time.monotonic()
        self._flusher.start()
        self._replayer.start()

    async def close(self, timeout_s: float = 20.0) -> None:
        """Drain: everything still in memory ends in Postgres or, failing that, the spool."""
        await self._flusher.stop()
        await self._replayer.stop()
        # Writes in flight are tasks of their own: stopping the loop above did not cut them.
        if self._writing or self._spilling:
            await asyncio.gather(*self._writing, *self._spilling, return_exceptions=True)
        self._closing = True  # from here on, rows nothing takes are left to the journal
        deadline = time.monotonic() + timeout_s
        while self._queue:
            batch = self._take()
            stored = await (
                self._write(batch) if time.monotonic() < deadline else self._spool(batch)
            )
            if not stored:
                self._requeue(batch)
        # The journal is dropped only if it guards nothing: every record is in Postgres or
        # the spool. Otherwise the next start replays it.
        self.journal.close(discard=self.records_kept_in_journal == 0)
        if self._pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._pool.close(), 5)
        log.info(
            "event=ledger_closed written=%d spooled=%d spool_files=%d kept_in_journal=%d",
            self.records_written,
            self.records_spooled,
            self.spool_files,
            self.records_kept_in_journal,
        )

    async def flush(self) -> None:
        """Write everything queued now (tests, shutdown); what cannot be stored stays queued."""
        requeues = self._requeues
        while self._queue and self._requeues == requeues:
            batch = self._take()
            if not await self._write(batch):
                self._requeue(batch)
        if self._writing:
            await asyncio.gather(*self._writing, return_exceptions=True)

    def _take(self, at_most: int | None = None) -> list[bytes]:
        queue = self._queue
        n = min(self.batch_size, len(queue), at_most or len(queue))
        return [queue.popleft() for _ in range(n)]

    def _requeue(self, batch: list[bytes]) -> None:
        """Rows neither Postgres nor the spool took: back to the queue, to be tried again;
        their journal segments are kept until then. At shutdown the journal keeps them."""
        if self._closing:
            self.records_kept_in_journal += len(batch)
            log.error(
                "event=ledger_rows_not_stored rows=%d kept_in=journal action=replay_at_start",
                len(batch),
            )
            return
        self._requeues += 1
        self._queue.extendleft(reversed(batch))

    async def _connect(self) -> asyncpg.Pool:
        if self._pool is None:
            self._pool = await asyncpg.create_pool(
                self._dsn,
                min_size=1,
                max_size=2,
                timeout=5,
                command_timeout=_STATEMENT_TIMEOUT_S,
            )
        return self._pool

    async def _flush_round(self) -> None:
        """Every flush interval, or at once when a batch is full."""
        if not self._queue:
            return
        try:
            stored = await self._flush_queued()
        except Exception:
            # Counted, with its traceback: whatever broke, the next round goes on.
            self.flush_errors += 1
            log.exception("event=ledger_flush_failed action=retry")
            stored = False
        if not stored:
            await asyncio.sleep(_RETRY_AFTER_S)
        if len(self._queue) >= self.batch_size:
            self._flusher.wake()

    async def _flush_queued(self) -> bool:
        """Store what is queued now; True when all of it reached Postgres or the spool."""
        if not self._held:
            # Records submitted from now on go to a new segment; the old one goes once
            # everything taken below is durable. While rows are being retried there is no
            # new segment: the current one keeps them all.
            segment = self.journal.rotate()
            if segment is not None:
                self._held.append(segment)
        requeues = self._requeues
        # What is queued now, no more: rows that come back to the queue wait for the next
        # flush (after a pause) instead of being retried at once in a loop.
        left = len(self._queue)
        while left > 0 and self._queue:
            if len(self._writing) >= _CONCURRENT_WRITES:
                await asyncio.wait(self._writing, return_when=asyncio.FIRST_COMPLETED)
                continue
            batch = self._take(left)
            left -= len(batch)
            task = asyncio.create_task(self._store(batch))
            self._writing.add(task)
            task.add_done_callback(self._writing.discard)
        if self._writing or self._spilling:
            await asyncio.wait({*self._writing, *self._spilling})
        if self._requeues != requeues:
            return False
        self._durable += self._held
        self._held.clear()
        # A replay of a segment left behind would change nothing; deleting it is tidiness.
        self._durable = [s for s in self._durable if not self.journal.discard(s)]
        return True

    async def _store(self, batch: list[bytes]) -> None:
        if not await self._write(batch):
            self._requeue(batch)

    async def _write(self, batch: list[bytes]) -> bool:
        """Into Postgres, else into the spool; False when neither took the rows."""
        if not batch:
            return True
        if self.database_ok:
            try:
                pool = await self._connect()
                started = time.perf_counter()
                async with pool.acquire() as connection:
                    stored = await self._repository.store(
                        connection, batch, self._months, BatchSource.LIVE
                    )
                metrics.BATCH_SECONDS.observe(time.perf_counter() - started)
                self._count_stored(stored, len(batch))
                self.records_written += len(batch) - stored.quarantined
                return True
            except asyncio.CancelledError:
                # Whether the insert committed is unknown: keep the rows (a replay of rows
                # already stored inserts nothing), even if it blocks this one moment.
                try:
                    self.spool.write(batch)
                    self.records_spooled += len(batch)
                except OSError:
                    self._requeue(batch)
                raise
            except Exception as exc:
                self._down_until = time.monotonic() + _RETRY_AFTER_S
                log.warning(
                    "event=ledger_write_failed error=%s rows=%d action=spool",
                    type(exc).__name__,
                    len(batch),
                )
        return await self._spool(batch)

    def _count_stored(self, stored: Stored, rows: int) -> None:
        if stored.quarantined:
            self.records_quarantined += stored.quarantined
            log.error(
                "event=ledger_rows_quarantined rows=%d of=%d report=/billing/reports/quarantine",
                stored.quarantined,
                rows,
            )

    async def _spool(self, batch: list[bytes]) -> bool:
        try:
            path = await asyncio.to_thread(self.spool.write, batch)
        except OSError as exc:
            self.spool_errors += 1
            self._spool_down_until = time.monotonic() + _RETRY_AFTER_S
            log.error("event=ledger_spool_failed error=%s rows=%d action=retry", exc, len(batch))
            return False
        self.records_spooled += len(batch)
        self.spool_files += 1
        log.info("event=ledger_spooled file=%s rows=%d", path.name, len(batch))
        return True

    def _update_spool_stats(self) -> None:
        self.spool_files, self.spool_bytes = self.spool.stats()

    async def _replay_round(self) -> None:
        if time.monotonic() - self._orphans_checked > _ORPHANS_EVERY_S:
            self._orphans_checked = time.monotonic()
            await asyncio.to_thread(self.spool.recover_orphans)
            # A worker killed while the others run: its journal is theirs to replay.
            await asyncio.to_thread(self.journal.recover_into, self.spool.directory, False)
        await asyncio.to_thread(self._update_spool_stats)
        if self.spool_files:
            await self._replay_all()

    async def _replay_all(self) -> None:
        for path in await asyncio.to_thread(self.spool.pending):
            if not await self._replay(path):
                break
        self._update_spool_stats()

    async def _replay(self, path: Path) -> bool:
        """Insert one spooled batch; False when the database is still unavailable."""
        claimed = await asyncio.to_thread(self.spool.claim, path)
        if claimed is None:
            return True
        try:
            records = await asyncio.to_thread(self.spool.read, claimed)
            stored = Stored()
            if records:
                pool = await self._connect()
                async with pool.acquire() as connection:
                    # A spill or a journal recovered at start holds far more than a batch:
                    # it is stored a batch at a time too, so that a replay while serving
                    # never holds Postgres (and a core) for long.
                    for start in range(0, len(records), self.batch_size):
                        part = records[start : start + self.batch_size]
                        stored += await self._repository.store(
                            connection, part, months_of(part), BatchSource.REPLAY
                        )
        except BAD_DATA as exc:
            # Only if even the quarantine refused a row: set the file aside, never block.
            target = await asyncio.to_thread(self.spool.reject, claimed)
            log.error("event=spool_batch_rejected file=%s error=%s", target, exc)
            return True
        except BaseException as exc:
            await asyncio.to_thread(self.spool.release, claimed)
            if isinstance(exc, Exception):
                self._down_until = time.monotonic() + _RETRY_AFTER_S
                return False
            raise
        await asyncio.to_thread(self.spool.done, claimed)
        self._down_until = 0.0
        self._count_stored(stored, len(records))
        self.records_replayed += stored.inserted
        log.info(
            "event=spool_replayed file=%s rows=%d new=%d quarantined=%d",
            path.name,
            len(records),
            stored.inserted,
            stored.quarantined,
        )
        return True
