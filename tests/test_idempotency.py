"""`Idempotency-Key`: one run per key and request, settled by Postgres even when concurrent."""

from __future__ import annotations

import asyncio
import secrets

import pytest
from pydantic import BaseModel

from service.db.engine import create_engine, session_factory, transaction
from service.idempotency.service import IdempotencyKeyReused, idempotent


class Answer(BaseModel):
    run: int
    amount: str


async def _scenario(url: str) -> None:
    engine = create_engine(url, pool_size=4)
    sessions = session_factory(engine)
    runs: list[int] = []
    scope = f"POST /test/{secrets.token_hex(4)}"
    started = asyncio.Event()

    async def produce(amount: str, hold: float = 0.0) -> Answer:
        runs.append(len(runs) + 1)
        started.set()
        await asyncio.sleep(hold)  # the transaction stays open, its claim uncommitted
        return Answer(run=len(runs), amount=amount)

    async def call(key: str, body: dict[str, str], hold: float = 0.0) -> Answer:
        async with transaction(sessions) as session:
            return await idempotent(
                session, scope, key, body, lambda: produce(body["amount"], hold), Answer
            )

    try:
        first = await call("k1", {"amount": "1.50"})
        again = await call("k1", {"amount": "1.50"})
        assert again == first and runs == [1]
        # Key order and spacing do not make another request; another value does.
        with pytest.raises(IdempotencyKeyReused):
            await call("k1", {"amount": "1.5"})
        assert runs == [1]
        # Without a key, every call runs.
        async with transaction(sessions) as session:
            await idempotent(session, scope, None, {}, lambda: produce("0"), Answer)
        assert runs == [1, 2]

        # Concurrent duplicates: the second claim waits on the first's uncommitted row and
        # then answers its result; the work ran once.
        started.clear()
        slow = asyncio.create_task(call("k2", {"amount": "7"}, hold=0.5))
        await started.wait()
        fast = asyncio.create_task(call("k2", {"amount": "7"}))
        a, b = await asyncio.gather(slow, fast)
        assert a == b and runs == [1, 2, 3]

        # A request that fails stores nothing: the same key may be retried.
        class Refused(Exception):
            pass

        async def refuse() -> Answer:
            raise Refused

        with pytest.raises(Refused):
            async with transaction(sessions) as session:
                await idempotent(session, scope, "k3", {"amount": "2"}, refuse, Answer)
        assert (await call("k3", {"amount": "2"})).amount == "2"
    finally:
        await engine.dispose()


def test_one_run_per_key_and_request_even_concurrently(database_url: str) -> None:
    asyncio.run(_scenario(database_url))
