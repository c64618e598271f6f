"""The key directory on its own: one definition of a usable key, one load for authentication
and limits, and a worker's one listening connection that keeps it current."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
import pytest
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from service.auth.key_cache import KeyCache, KeyLimits
from service.auth.keys import generate_key
from service.auth.usability import key_status, key_usable, usable_key
from service.db.channels import Channel, notify
from service.db.engine import asyncpg_dsn, create_engine, session_factory
from service.db.listener import Listener
from service.db.models import Account, ApiKey


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(database_url, 2)
    try:
        yield engine
    finally:
        await engine.dispose()


async def eventually(condition: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not callable(condition) or not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def new_key(engine: AsyncEngine, **fields: object) -> tuple[str, ApiKey]:
    """A key (plaintext, row) of a new pro account with limits of its own."""
    made = generate_key()
    async with session_factory(engine)() as session, session.begin():
        account = Account(
            name="directory", tier="pro", rate_limit_rpm=7, monthly_budget_usd=Decimal("3")
        )
        session.add(account)
        await session.flush()
        key = ApiKey(
            account_id=account.id,
            prefix=made.prefix,
            key_hash=made.key_hash,
            rate_limit_tpm=900,
            **fields,
        )
        session.add(key)
    return made.plaintext, key


async def test_a_usable_key_is_the_same_in_python_and_in_sql(engine: AsyncEngine) -> None:
    """Every combination of revoked and expiry, at a fixed instant and at the database's."""
    now = datetime(2026, 6, 1, 12, tzinfo=UTC)
    revoked = (None, now - timedelta(days=1))
    expiries = (None, now - timedelta(seconds=1), now, now + timedelta(microseconds=1))
    async with session_factory(engine)() as session, session.begin():
        account = Account(name="usability")
        session.add(account)
        await session.flush()
        for revoked_at, expires_at in itertools.product(revoked, expiries):
            made = generate_key()
            session.add(
                ApiKey(
                    account_id=account.id,
                    prefix=made.prefix,
                    key_hash=made.key_hash,
                    revoked_at=revoked_at,
                    expires_at=expires_at,
                )
            )
        await session.flush()
        rows = (
            await session.execute(
                select(
                    ApiKey.revoked_at,
                    ApiKey.expires_at,
                    usable_key(now).label("usable"),
                    usable_key().label("usable_now"),
                    func.now().label("db_now"),
                ).where(ApiKey.account_id == account.id)
            )
        ).all()
        await session.rollback()
    assert len(rows) == 8
    for row in rows:
        assert row.usable is key_usable(row.revoked_at, row.expires_at, now), row
        assert row.usable_now is key_usable(row.revoked_at, row.expires_at, row.db_now), row
    statuses = {key_status(r.revoked_at, r.expires_at, now) for r in rows}
    assert statuses == {"active", "revoked", "expired"}
    assert sum(r.usable for r in rows) == 2  # not revoked; no expiry or one still ahead


async def test_one_load_serves_authentication_and_limits(
    engine: AsyncEngine, database_url: str
) -> None:
    plaintext, key = await new_key(engine)
    keys = KeyCache(engine, 3600, Listener(asyncpg_dsn(database_url)))
    await keys.start()
    try:
        found = await keys.lookup(plaintext)
        assert found is not None and found.key_id == key.id
        assert found.limits == KeyLimits(
            key.id,
            key.account_id,
            "pro",
            account_rpm=7,
            account_budget_usd=Decimal("3"),
            key_tpm=900,
        )
        # Admission reads the same entry, with no query: the database is gone.
        await engine.dispose()
        assert await keys.limits(key.id, key.account_id) is found.limits
    finally:
        await keys.stop()


async def test_a_key_created_after_the_load_is_found_on_its_first_request(
    engine: AsyncEngine, database_url: str
) -> None:
    keys = KeyCache(engine, 3600, Listener(asyncpg_dsn(database_url)))
    await keys.start()
    try:
        plaintext, key = await new_key(engine)
        expired_plaintext, expired = await new_key(
            engine, expires_at=datetime.now(UTC) - timedelta(seconds=1)
        )
        found, again = await asyncio.gather(keys.lookup(plaintext), keys.lookup(plaintext))
        assert found is not None and found is again and found.key_id == key.id
        assert (await keys.limits(key.id, key.account_id)).account_rpm == 7
        assert await keys.lookup(expired_plaintext) is None
        # An authenticated key the directory does not hold still gets its own limits.
        assert (await keys.limits(expired.id, expired.account_id)).key_tpm == 900
        unknown = await keys.limits(uuid.uuid4(), key.account_id)
        assert unknown.tier == "basic" and unknown.account_rpm is None
    finally:
        await keys.stop()


async def revoke(engine: AsyncEngine, key_id: uuid.UUID, *, tell: bool) -> None:
    async with session_factory(engine)() as session, session.begin():
        await session.execute(
            update(ApiKey).where(ApiKey.id == key_id).values(revoked_at=func.now())
        )
        if tell:
            await notify(session, Channel.KEYS, str(key_id))


async def test_one_listening_connection_follows_every_channel(
    engine: AsyncEngine, database_url: str
) -> None:
    plaintext, key = await new_key(engine)
    listener = Listener(asyncpg_dsn(database_url))
    keys = KeyCache(engine, 3600, listener)  # reloads only when told
    tasks: list[str] = []
    listener.subscribe(Channel.TASKS, tasks.append, lambda: None)
    await listener.start()
    await keys.start()
    try:
        assert await keys.lookup(plaintext) is not None
        await revoke(engine, key.id, tell=True)
        async with session_factory(engine)() as session, session.begin():
            await notify(session, Channel.TASKS, '{"event": "closed"}')
        await eventually(lambda: tasks == ['{"event": "closed"}'])
        assert await keys.lookup(plaintext) is None
        assert (await keys.limits(key.id, key.account_id)).key_tpm == 900  # loaded, not held
        assert await keys.lookup(plaintext) is None
    finally:
        await keys.stop()
        await listener.close()


async def test_a_lost_listening_connection_reopens_and_reloads(
    engine: AsyncEngine, database_url: str
) -> None:
    """A revocation sent while nobody listened is missed: the reopened connection reloads."""
    plaintext, key = await new_key(engine)
    listener = Listener(asyncpg_dsn(database_url))
    keys = KeyCache(engine, 3600, listener)
    await listener.start()
    await keys.start()
    try:
        assert await keys.lookup(plaintext) is not None
        assert listener._connection is not None
        listening = listener._connection.get_server_pid()
        connection = await asyncpg.connect(asyncpg_dsn(database_url))
        try:
            assert await connection.fetchval("SELECT pg_terminate_backend($1)", listening)
        finally:
            await connection.close()
        await revoke(engine, key.id, tell=False)

        async def refused() -> None:
            while await keys.lookup(plaintext) is not None:
                await asyncio.sleep(0.05)

        await asyncio.wait_for(refused(), 5)
        assert listener.connected
        assert listener._connection.get_server_pid() != listening
    finally:
        await keys.stop()
        await listener.close()
