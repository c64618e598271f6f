"""`Idempotency-Key` for the admin's POSTs that create money (adjustments, credits, …).

A client that retries a POST after a timeout must not create the money twice. It sends
`Idempotency-Key: <its own unique string>`; the first request with that key in a route's
scope runs and its answer (status and body) is stored with a hash of the request; the same
key with the same request again answers the stored result and does nothing; the same key
with another request is a 409 (`idempotency_key_reused`). The claim of a key and the work
it guards commit in one transaction: a request that fails stores nothing, so it can be
retried with the same key; two concurrent requests with one key are settled by the table's
primary key (the second waits for the first's transaction, then answers its result).

Use from an endpoint: `await idempotent(session, scope, key, request, produce, Model)`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import orjson
from fastapi import Header
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncSession

from service.errors import Conflict
from service.idempotency.repository import IdempotencyRepository
from service.schemas import Text

M = TypeVar("M", bound=BaseModel)

# The header, as an endpoint takes it: optional (without it, every request runs).
IdempotencyKeyHeader = Annotated[
    Text | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        description="A unique string of the client's: the same key and request again"
        " answers the first result and changes nothing; the same key with another"
        " request is a 409.",
    ),
]


class IdempotencyKeyReused(Conflict):
    code = "idempotency_key_reused"
    description = "The `Idempotency-Key` was used already, for another request."


def request_hash(request: Any) -> bytes:
    """SHA-256 of the request as parsed (path parameters and body), in canonical JSON: two
    bodies that differ only by spacing or key order are the same request."""
    if isinstance(request, BaseModel):
        request = request.model_dump(mode="json")
    canonical = orjson.dumps(request, option=orjson.OPT_SORT_KEYS, default=str)
    return hashlib.sha256(canonical).digest()


async def idempotent(
    session: AsyncSession,
    scope: str,
    key: str | None,
    request: Any,
    produce: Callable[[], Awaitable[M]],
    model: type[M],
    status_code: int = 201,
) -> M:
    """The answer of `produce()` for this request, run at most once per (`scope`, `key`).

    `scope` names the route (`POST /billing/accounts/{id}/adjustments`); `request` is what
    makes two requests the same (a dict of the path parameters and the parsed body). Without
    a key, `produce()` simply runs.
    """
    if key is None:
        return await produce()
    repository = IdempotencyRepository(session)
    fingerprint = request_hash(request)
    if await repository.claim(scope, key, fingerprint):
        result = await produce()
        await repository.answer(scope, key, status_code, result.model_dump(mode="json"))
        return result
    stored = await repository.get(scope, key)
    # The claim found a committed row (a concurrent claim's is waited for), answered in the
    # transaction that claimed it.
    assert stored is not None and stored.response is not None
    if stored.request_hash != fingerprint:
        raise IdempotencyKeyReused(
            f"Idempotency-Key {key!r} was used for another request at"
            f" {stored.created_at.isoformat()}; use a new key for a new request",
            param="header.idempotency-key",
        )
    return model.model_validate(stored.response)
