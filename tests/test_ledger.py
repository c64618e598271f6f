"""The ledger writer against a real Postgres: batches, idempotent replays, the durable spool,
and a database that goes away and comes back."""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from pricing.invoice import BillingPeriod
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
    await killed._flusher.stop()
    await killed._replayer.stop()
    assert await acount(db, account_id) == 0
    restarted = LedgerWriter(dsn, tmp_path)  # same pid: at start-up, that is a stale one
    await restarted.start()
    await restarted.close()
    assert await acount(db, account_id) == 12
    assert list((tmp_path / "journal").iterdir()) == []
    if killed._pool is not None:
        await killed._pool.close()


def quarantined(db: Database, *request_ids: str) -> list[dict[str, object]]:
    return db.fetch(
        "SELECT request_id, account_id, source, sqlstate, reason, record FROM usage_quarantine"
        " WHERE request_id = ANY($1::text[]) ORDER BY request_id",
        list(request_ids),
    )


def bad_records(account_id: uuid.UUID) -> list[LedgerRecord]:
    """Rows Postgres refuses for their content, whatever the proxy lets through."""
    return [
        record(account_id, requested_model="mock\x00chat"),  # text cannot hold a NUL
        record(account_id, cached_tokens=2**63),  # past bigint
        record(account_id, status_code=40_000),  # past smallint
        record(account_id, usage_source="invented"),  # the check constraint
    ]


async def test_rows_postgres_refuses_are_quarantined_and_their_batch_is_stored(
    database_url: str, db: Database, tmp_path: Path
) -> None:
    """One batch: 300 rows of one account, 4 bad rows of another among them."""
    writer = LedgerWriter(asyncpg_dsn(database_url), tmp_path, batch_size=1000)
    await writer.start()
    good_account, bad_account = uuid.uuid4(), uuid.uuid4()
    good = [record(good_account, prompt_tokens=i) for i in range(300)]
    bad = bad_records(bad_account)
    batch = good[:100] + bad[:2] + good[100:200] + bad[2:] + good[200:]
    for r in batch:
        writer.submit(r)
    await writer.flush()
    assert await acount(db, good_account) == 300
    total = await asyncio.to_thread(
        db.fetchval,
        "SELECT sum(prompt_tokens) FROM usage_ledger WHERE account_id = $1",
        good_account,
    )
    assert total == sum(range(300))
    assert await acount(db, bad_account) == 0
    rows = await asyncio.to_thread(quarantined, db, *(r.request_id for r in bad))
    assert [r["request_id"] for r in rows] == sorted(r.request_id for r in bad)
    assert {r["sqlstate"] for r in rows} == {"22P05", "22003", "23514"}
    assert all(r["source"] == "live" and r["account_id"] == bad_account for r in rows)
    by_id = {r["request_id"]: r for r in rows}
    kept = by_id[bad[0].request_id]["record"]
    assert isinstance(kept, bytes) and LedgerRecord.from_json(kept) == bad[0]  # kept exactly
    assert writer.records_quarantined == 4 and writer.records_written == 300
    await writer.close()
    assert not (tmp_path / "rejected").exists() and Spool(tmp_path).pending() == []


async def test_a_spooled_batch_with_bad_rows_is_replayed_row_by_row(
    database_url: str, db: Database, tmp_path: Path
) -> None:
    """What the spool held when Postgres came back, and what earlier versions set aside whole
    in `spool/rejected/`: only the bad rows stay out of the ledger."""
    good_account, bad_account = uuid.uuid4(), uuid.uuid4()
    spool = Spool(tmp_path)
    good = [record(good_account) for _ in range(40)]
    bad = bad_records(bad_account)
    spool.write([r.to_json() for r in good[:20] + bad[:2]])
    (tmp_path / "rejected").mkdir()
    rejected = spool.write([r.to_json() for r in bad[2:] + good[20:]])
    rejected.rename(tmp_path / "rejected" / rejected.name)

    writer = LedgerWriter(asyncpg_dsn(database_url), tmp_path)
    await writer.start()
    await writer.close()
    assert await acount(db, good_account) == 40
    rows = await asyncio.to_thread(quarantined, db, *(r.request_id for r in bad))
    assert len(rows) == 4 and {r["source"] for r in rows} == {"replay"}
    assert writer.records_quarantined == 4
    assert Spool(tmp_path).pending() == [] and list((tmp_path / "rejected").iterdir()) == []
    # Replayed again: nothing changes, nothing is quarantined twice.
    spool.write([r.to_json() for r in good + bad])
    again = LedgerWriter(asyncpg_dsn(database_url), tmp_path)
    await again.start()
    await again.close()
    assert await acount(db, good_account) == 40
    assert len(await asyncio.to_thread(quarantined, db, *(r.request_id for r in bad))) == 4


async def test_no_statement_stores_more_than_a_batch_live_or_replayed(
    database_url: str, db: Database, tmp_path: Path
) -> None:
    """Postgres stores a statement's rows in one burst of CPU the proxy then waits for: a
    spilled queue or a recovered journal (a spool file far larger than a batch) is replayed
    a batch at a time too, and every row lands once."""
    account_id = uuid.uuid4()
    spooled = [record(account_id) for _ in range(250)]
    Spool(tmp_path).write([r.to_json() for r in spooled])
    writer = LedgerWriter(asyncpg_dsn(database_url), tmp_path, batch_size=100)
    statements: list[int] = []
    insert = writer._repository.insert

    async def counted(connection: Any, lines: Sequence[bytes], months: Any) -> int:
        statements.append(len(lines))
        return await insert(connection, lines, months)

    writer._repository.insert = counted  # type: ignore[method-assign]
    await writer.start()
    assert statements == [100, 100, 50] and writer.records_replayed == 250
    statements.clear()
    for _ in range(230):
        writer.submit(record(account_id))
    await writer.close()
    assert sum(statements) == 230 and max(statements) <= 100
    assert await acount(db, account_id) == 480


async def test_token_counts_past_two_to_the_31_are_stored_exactly(
    database_url: str, db: Database, tmp_path: Path
) -> None:
    writer = LedgerWriter(asyncpg_dsn(database_url), tmp_path)
    await writer.start()
    account_id = uuid.uuid4()
    huge = record(
        account_id,
        prompt_tokens=2**31,
        completion_tokens=4_294_967_295,
        total_tokens=2**31 + 4_294_967_295,
        cached_tokens=3_000_000_000,
        reasoning_tokens=2**40,
    )
    neighbours = [record(account_id) for _ in range(8)]
    for r in [*neighbours[:4], huge, *neighbours[4:]]:
        writer.submit(r)
    await writer.close()
    assert await acount(db, account_id) == 9
    row = (
        await asyncio.to_thread(
            db.fetch, "SELECT * FROM usage_ledger WHERE request_id = $1", huge.request_id
        )
    )[0]
    for name in (
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "cached_tokens",
        "reasoning_tokens",
    ):
        assert row[name] == getattr(huge, name), name


async def test_partitions_are_found_by_the_utc_month_of_each_row(
    database_url: str, db: Database, tmp_path: Path
) -> None:
    """A time with another offset (a record read back from a file, say) is in the UTC month
    of its instant: 1 August 02:00 at +05:00 is July in UTC, 15 August is August."""
    plus5 = timezone(timedelta(hours=5))
    writer = LedgerWriter(asyncpg_dsn(database_url), tmp_path)
    await writer.start()
    account_id = uuid.uuid4()
    writer.submit(record(account_id, at=datetime(2033, 8, 1, 2, tzinfo=plus5)))
    writer.submit(record(account_id, at=datetime(2033, 8, 15, tzinfo=plus5)))
    await writer.close()
    rows = await asyncio.to_thread(
        db.fetch,
        "SELECT tableoid::regclass::text AS part FROM usage_ledger WHERE account_id = $1"
        " ORDER BY occurred_at",
        account_id,
    )
    assert [r["part"] for r in rows] == ["usage_ledger_p203307", "usage_ledger_p203308"]
    with pytest.raises(ValueError, match="no zone"):
        BillingPeriod.of(datetime(2033, 8, 1))  # naive: whose midnight would it be?
