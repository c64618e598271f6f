"""The ledger writer against a real Postgres: batches, idempotent replays, the durable spool,
and a database that goes away and comes back."""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from service.db.engine import asyncpg_dsn
from service.ledger.record import LedgerRecord, new_request_id
from service.ledger.spool import Spool
from service.ledger.writer import LedgerWriter
from tests.support import Database, free_port


def record(account_id: uuid.UUID, at: datetime | None = None, **fields: object) -> LedgerRecord:
    values: dict[str, object] = {
        "request_id": new_request_id(),
        "occurred_at": at or datetime.now(UTC),
        "account_id": account_id,
        "key_id": uuid.uuid4(),
        "task_id": "t-1",
        "task_type": "summarize",
        "endpoint": "chat",
        "requested_model": "m",
        "upstream_model": "m",
        "provider": "p",
        "stream": True,
        "status_code": 200,
        "error_code": None,
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "total_tokens": 15,
        "cached_tokens": 2,
        "reasoning_tokens": 1,
        "usage_source": "upstream",
        "latency_ms": 12,
        "ttft_ms": 3,
        "cost_usd": Decimal("0.000006000001"),
        "price_version_id": 7,
    }
    values.update(fields)
    return LedgerRecord(**values)  # type: ignore[arg-type]


def count(db: Database, account_id: uuid.UUID) -> int:
    value: int = db.fetchval("SELECT count(*) FROM usage_ledger WHERE account_id = $1", account_id)
    return value


async def eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    # The check may query the database synchronously: run it off the event loop.
    deadline = asyncio.get_running_loop().time() + timeout
    while not await asyncio.to_thread(check):
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def acount(db: Database, account_id: uuid.UUID) -> int:
    return await asyncio.to_thread(count, db, account_id)


def test_request_ids_are_time_ordered_and_unique() -> None:
    ids = [new_request_id() for _ in range(2000)]
    assert len(set(ids)) == 2000
    assert all(i.startswith("req_") and len(i) == 36 for i in ids)
    assert [i[:16] for i in ids] == sorted(i[:16] for i in ids)  # the millisecond prefix


async def test_rows_land_with_every_column_and_replays_change_nothing(
    database_url: str, db: Database, tmp_path: Path
) -> None:
    writer = LedgerWriter(asyncpg_dsn(database_url), tmp_path, flush_interval_s=0.05)
    await writer.start()
    account_id = uuid.uuid4()
    batch = [record(account_id) for _ in range(50)]
    for r in batch:
        writer.submit(r)
    await eventually(lambda: count(db, account_id) == 50)
    # The same records again (a replayed batch, a retried flush): nothing changes.
    for r in batch[:20]:
        writer.submit(r)
    await writer.flush()
    await writer.close()
    assert await acount(db, account_id) == 50
    rows = await asyncio.to_thread(
        db.fetch, "SELECT * FROM usage_ledger WHERE request_id = $1", batch[0].request_id
    )
    row = rows[0]
    for name in (
        "task_id",
        "endpoint",
        "prompt_tokens",
        "cached_tokens",
        "reasoning_tokens",
        "cost_usd",
        "price_version_id",
        "ttft_ms",
        "usage_source",
        "key_id",
    ):
        assert row[name] == getattr(batch[0], name), name
    assert row["kind"] == "usage" and row["recorded_at"] is not None


async def test_rows_of_a_month_without_a_partition_create_it(
    database_url: str, db: Database, tmp_path: Path
) -> None:
    writer = LedgerWriter(asyncpg_dsn(database_url), tmp_path)
    await writer.start()
    account_id = uuid.uuid4()
    writer.submit(record(account_id, at=datetime(2031, 7, 14, 12, tzinfo=UTC)))
    await writer.close()
    assert await acount(db, account_id) == 1
    name = await asyncio.to_thread(db.fetchval, "SELECT to_regclass('usage_ledger_p203107')::text")
    assert name == "usage_ledger_p203107"


async def test_batches_go_to_the_spool_when_postgres_is_down_and_replay_at_start(
    database_url: str, db: Database, tmp_path: Path
) -> None:
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere"
    writer = LedgerWriter(dead, tmp_path, flush_interval_s=0.05)
    await writer.start()
    account_id = uuid.uuid4()
    records = [record(account_id) for _ in range(30)]
    for r in records:
        writer.submit(r)
    await eventually(lambda: writer.records_spooled == 30)
    await writer.close()
    assert writer.queue_depth == 0
    files = Spool(tmp_path).pending()
    assert files and sum(len(Spool.read(f)) for f in files) == 30
    # The same spool replayed by a process that reaches Postgres (a restart after the
    # outage); and a copy of one file replayed again changes nothing.
    duplicate = tmp_path / ("0" + files[0].name)
    duplicate.write_bytes(files[0].read_bytes())
    restarted = LedgerWriter(asyncpg_dsn(database_url), tmp_path)
    await restarted.start()
    await restarted.close()
    assert await acount(db, account_id) == 30
    assert Spool(tmp_path).pending() == []
    total = await asyncio.to_thread(
        db.fetchval, "SELECT sum(total_tokens) FROM usage_ledger WHERE account_id = $1", account_id
    )
    assert total == 30 * 15


@contextlib.asynccontextmanager
async def tcp_forwarder(port: int, target: int) -> AsyncIterator[asyncio.Server]:
    """A loopback TCP relay to Postgres: closing it is Postgres going away for the writer."""
    connections: list[asyncio.StreamWriter] = []

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target)
        connections.extend([writer, up_writer])
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    try:
        yield server
    finally:
        server.close()
        for connection in connections:
            connection.close()
        await server.wait_closed()


async def test_postgres_outage_while_running_loses_nothing(
    database_url: str, db: Database, tmp_path: Path
) -> None:
    from sqlalchemy.engine import make_url

    real = make_url(database_url)
    if real.host is None or "host" in real.query:
        pytest.skip("cutting the connection needs Postgres over TCP (the embedded one is a socket)")
    port = free_port()
    relayed = real.set(host="127.0.0.1", port=port).render_as_string(hide_password=False)
    writer = LedgerWriter(asyncpg_dsn(relayed), tmp_path, batch_size=10, flush_interval_s=0.05)
    account_id = uuid.uuid4()
    async with tcp_forwarder(port, real.port or 5432):
        await writer.start()
        for _ in range(25):
            writer.submit(record(account_id))
        await eventually(lambda: writer.records_written == 25)
    # Postgres "down": the relay is gone, its connections cut.
    for _ in range(40):
        writer.submit(record(account_id))
    await eventually(lambda: writer.records_spooled == 40)
    assert writer.spool_files >= 1 and not writer.database_ok
    assert await acount(db, account_id) == 25
    # Back: the replay loop empties the spool on its own.
    async with tcp_forwarder(port, real.port or 5432):
        await eventually(lambda: count(db, account_id) == 65, timeout=15)
        await eventually(lambda: writer.spool_files == 0)
        await writer.close()
    assert await acount(db, account_id) == 65


def test_a_spool_file_is_claimed_by_one_worker_only(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    path = spool.write([record(uuid.uuid4()).to_json()])
    first = spool.claim(path)
    assert first is not None and spool.claim(path) is None  # already taken
    assert spool.pending() == []
    # Claimed by a process that has died since: given back at the next start.
    os.rename(first, tmp_path / f"{path.name}.claim-999999999")
    assert spool.recover_orphans() == 1
    assert spool.pending() == [path]


def test_an_interrupted_spool_write_keeps_its_complete_lines(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    records = [record(uuid.uuid4()) for _ in range(3)]
    torn = b"\n".join(r.to_json() for r in records) + b"\n" + records[0].to_json()[:25]
    (tmp_path / "00000000000000000001-999999999-000000.jsonl.999999999.tmp").write_bytes(torn)
    assert spool.recover_orphans(at_start=True) == 1
    [path] = spool.pending()
    assert [LedgerRecord.from_json(line).request_id for line in Spool.read(path)] == [
        r.request_id for r in records
    ]


@pytest.mark.parametrize("cost", [None, Decimal("0"), Decimal("1.000000000001")])
def test_spooled_records_round_trip_exactly(cost: Decimal | None) -> None:
    original = record(uuid.uuid4(), cost_usd=cost, key_id=None, task_id=None)
    assert LedgerRecord.from_json(original.to_json()) == original


async def test_records_still_in_memory_survive_a_killed_process(
    database_url: str, db: Database, tmp_path: Path
) -> None:
    dsn = asyncpg_dsn(database_url)
    killed = LedgerWriter(dsn, tmp_path, batch_size=100_000, flush_interval_s=60)
    await killed.start()
    account_id = uuid.uuid4()
    for _ in range(12):
        killed.submit(record(account_id))
    # The process dies here (SIGKILL): no flush, no drain, the queue is gone.
    for task in killed._tasks:
        task.cancel()
    assert await acount(db, account_id) == 0
    restarted = LedgerWriter(dsn, tmp_path)  # same pid: at start-up, that is a stale one
    await restarted.start()
    await restarted.close()
    assert await acount(db, account_id) == 12
    assert list((tmp_path / "journal").iterdir()) == []
    if killed._pool is not None:
        await killed._pool.close()
