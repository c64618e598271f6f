"""The ledger writer: records leave the response path through memory and reach Postgres in batches.

`submit` is all a request does: the record's JSON line is appended to the journal and to
an in-memory queue; that line is all the rest of the path handles (the batch insert,
the spool, the replay). A background task takes batches of up
to `batch_size` records, at least every `flush_interval` seconds, and inserts each in one
idempotent statement. When Postgres fails, the batch goes to the durable spool instead and
the server keeps serving; a second task replays spooled batches once Postgres answers
again. Start-up replays what a crash left; `close` (graceful shutdown) writes or spools
everything still in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from datetime import datetime
from pathlib import Path

import asyncpg

from service.ledger.journal import Journal
from service.ledger.record import LedgerRecord, month_of, months_of
from service.ledger.repository import LedgerRepository
from service.ledger.spool import Spool
from service.metrics import registry as metrics

log = logging.getLogger("meterline.ledger")

# After a failure, batches go straight to the spool for this long instead of each waiting
# for a connection attempt; the replay loop probes the database meanwhile.
_RETRY_AFTER_S = 1.0
_REPLAY_EVERY_S = 0.5
_ORPHANS_EVERY_S = 30.0
_STATEMENT_TIMEOUT_S = 30.0
# Batches written at once: one is encoded here while Postgres stores the other.
_CONCURRENT_WRITES = 2

# Postgres refused the rows themselves: retrying the same batch can never succeed.
_BAD_DATA = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError)


class LedgerWriter:
    def __init__(
        self,
        dsn: str,
        spool_dir: Path,
        batch_size: int = 1000,
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
        self._months: dict[tuple[int, int], datetime] = {}  # partition months submitted
        self._wake = asyncio.Event()
        self._repository = LedgerRepository()
        self._pool: asyncpg.Pool | None = None
        self._down_until = 0.0
        self._tasks: list[asyncio.Task[None]] = []
        self._spilling: set[asyncio.Task[None]] = set()
        self._writing: set[asyncio.Task[None]] = set()
        self._closing = False
        # Read by /metrics.
        self.records_written = 0
        self.records_spooled = 0
        self.records_replayed = 0
        self.batches_failed = 0
        self.spool_files = 0
        self.spool_bytes = 0

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def database_ok(self) -> bool:
        return time.monotonic() >= self._down_until

    def submit(self, record: LedgerRecord) -> None:
        """Hand a record over; never blocks, never fails, never touches the database."""
        line = record.to_json()
        self.journal.append(line)  # survives a killed process from here on
        at = record.occurred_at
        if (at.year, at.month) not in self._months:
            self._months[(at.year, at.month)] = month_of(at)
        queue = self._queue
        queue.append(line)
        if len(queue) >= self.batch_size:
            self._wake.set()
            if len(queue) >= self.queue_max:
                self._spill()

    def _spill(self) -> None:
        # The writer cannot keep up (or Postgres is down and the disk is slow): move the
        # backlog to the spool rather than grow without bound or drop anything.
        batch = list(self._queue)
        self._queue.clear()
        task = asyncio.create_task(self._spool(batch))
        self._spilling.add(task)
        task.add_done_callback(self._spilling.discard)

    async def start(self) -> None:
        await asyncio.to_thread(self.journal.recover_into, self.spool.directory, True)
        self.journal.open()
        await asyncio.to_thread(self.spool.recover_orphans, True)
        self._update_spool_stats()
        with contextlib.suppress(Exception):
            await self._connect()
        if self.spool_files:
            log.info("event=spool_replay_at_start files=%d", self.spool_files)
            await self._replay_all()
        self._tasks = [
            asyncio.create_task(self._flush_forever(), name="ledger-flush"),
            asyncio.create_task(self._replay_forever(), name="ledger-replay"),
        ]

    async def close(self, timeout_s: float = 20.0) -> None:
        """Drain: everything still in memory ends in Postgres or, failing that, the spool."""
        self._closing = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # Writes in flight are tasks of their own: stopping the loop above did not cut them.
        if self._writing or self._spilling:
            await asyncio.gather(*self._writing, *self._spilling, return_exceptions=True)
        deadline = time.monotonic() + timeout_s
        while self._queue:
            batch = self._take()
            if time.monotonic() < deadline:
                await self._write(batch)
            else:
                await self._spool(batch)
        # Everything is in Postgres or the spool: the journal has nothing left to guard.
        self.journal.close()
        if self._pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._pool.close(), 5)
        log.info(
            "event=ledger_closed written=%d spooled=%d spool_files=%d",
            self.records_written,
            self.records_spooled,
            self.spool_files,
        )

    async def flush(self) -> None:
        """Write everything queued now (tests, shutdown)."""
        while self._queue:
            await self._write(self._take())
        if self._writing:
            await asyncio.gather(*self._writing, return_exceptions=True)

    def _take(self) -> list[bytes]:
        queue = self._queue
        n = min(self.batch_size, len(queue))
        return [queue.popleft() for _ in range(n)]

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

    async def _flush_forever(self) -> None:
        while True:
            if len(self._queue) < self.batch_size:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.flush_interval_s)
            self._wake.clear()
            if not self._queue:
                continue
            # Records submitted from now on go to a new journal segment; the old one goes
            # once everything taken below is in Postgres or the spool.
            segment = self.journal.rotate()
            while self._queue:
                if len(self._writing) >= _CONCURRENT_WRITES:
                    await asyncio.wait(self._writing, return_when=asyncio.FIRST_COMPLETED)
                    continue
                task = asyncio.create_task(self._write(self._take()))
                self._writing.add(task)
                task.add_done_callback(self._writing.discard)
            if self._writing or self._spilling:
                await asyncio.wait({*self._writing, *self._spilling})
            self.journal.discard(segment)

    async def _write(self, batch: list[bytes]) -> None:
        if not batch:
            return
        if self.database_ok:
            try:
                pool = await self._connect()
                started = time.perf_counter()
                async with pool.acquire() as connection:
                    await self._repository.insert(connection, batch, self._months.values())
                metrics.BATCH_SECONDS.observe(time.perf_counter() - started)
                self.records_written += len(batch)
                return
            except asyncio.CancelledError:
                # Whether the insert committed is unknown: keep the rows (a replay of rows
                # already stored inserts nothing), even if it blocks this one moment.
                self.spool.write(batch)
                self.records_spooled += len(batch)
                raise
            except _BAD_DATA as exc:
                # Never expected (the proxy validates what it records): keep the rows for
                # an operator instead of retrying forever.
                log.error("event=ledger_batch_refused error=%s rows=%d", exc, len(batch))
            except Exception as exc:
                self._down_until = time.monotonic() + _RETRY_AFTER_S
                self.batches_failed += 1
                log.warning(
                    "event=ledger_write_failed error=%s rows=%d action=spool",
                    type(exc).__name__,
                    len(batch),
                )
        await self._spool(batch)

    async def _spool(self, batch: list[bytes]) -> None:
        path = await asyncio.to_thread(self.spool.write, batch)
        self.records_spooled += len(batch)
        self.spool_files += 1
        log.info("event=ledger_spooled file=%s rows=%d", path.name, len(batch))

    def _update_spool_stats(self) -> None:
        self.spool_files, self.spool_bytes = self.spool.stats()

    async def _replay_forever(self) -> None:
        last_orphan_check = time.monotonic()
        while True:
            await asyncio.sleep(_REPLAY_EVERY_S)
            try:
                if time.monotonic() - last_orphan_check > _ORPHANS_EVERY_S:
                    last_orphan_check = time.monotonic()
                    await asyncio.to_thread(self.spool.recover_orphans)
                    # A worker killed while the others run: its journal is theirs to replay.
                    await asyncio.to_thread(self.journal.recover_into, self.spool.directory, False)
                await asyncio.to_thread(self._update_spool_stats)
                if self.spool_files:
                    await self._replay_all()
            except Exception as exc:
                log.warning("event=spool_replay_error error=%s", type(exc).__name__)

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
            if records:
                pool = await self._connect()
                async with pool.acquire() as connection:
                    inserted = await self._repository.insert(
                        connection, records, months_of(records)
                    )
            else:
                inserted = 0
        except _BAD_DATA as exc:
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
        self.records_replayed += inserted
        log.info("event=spool_replayed file=%s rows=%d new=%d", path.name, len(records), inserted)
        return True
