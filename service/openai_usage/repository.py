"""The ledger summed per time bucket and group, as OpenAI's usage and costs APIs report it."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, literal, select
from sqlalchemy.ext.asyncio import AsyncSession

from service.db.models import UsageRecord

L = UsageRecord

# OpenAI's group names → the ledger column each is read from (projects are accounts).
GROUP_COLUMNS: dict[str, Any] = {
    "project_id": L.account_id,
    "api_key_id": L.key_id,
    "model": L.requested_model,
    "line_item": L.requested_model,
}


@dataclass(frozen=True, slots=True)
class BucketQuery:
    """Ledger rows of [start, end) on some endpoints, in buckets of `width_s` from `origin`."""

    origin: datetime
    start: datetime
    end: datetime
    width_s: int
    endpoints: tuple[str, ...]
    account_ids: Sequence[uuid.UUID] = ()
    key_ids: Sequence[uuid.UUID] = ()
    models: Sequence[str] = ()
    group_by: Sequence[str] = field(default_factory=tuple)


async def bucket_sums(session: AsyncSession, query: BucketQuery) -> list[dict[str, Any]]:
    """One row per (bucket index, groups): requests, tokens and exact cost."""
    # Whole seconds from the origin are exact in float8: the bucket index never rounds wrong.
    offset = func.extract("epoch", L.occurred_at) - literal(int(query.origin.timestamp()))
    bucket = func.floor(offset / query.width_s).label("bucket")
    groups = [GROUP_COLUMNS[name].label(name) for name in query.group_by]
    statement = (
        select(
            bucket,
            *groups,
            func.count().label("requests"),
            func.coalesce(func.sum(L.prompt_tokens), 0).label("input_tokens"),
            func.coalesce(func.sum(L.completion_tokens), 0).label("output_tokens"),
            func.coalesce(func.sum(L.cached_tokens), 0).label("input_cached_tokens"),
            func.coalesce(func.sum(L.cost_usd), 0).label("cost_usd"),  # NUMERIC: exact
        )
        .where(L.occurred_at >= query.start, L.occurred_at < query.end)
        .where(L.endpoint.in_(query.endpoints))
        .group_by(bucket, *groups)
        .order_by(bucket, *groups)
    )
    if query.account_ids:
        statement = statement.where(L.account_id.in_(query.account_ids))
    if query.key_ids:
        statement = statement.where(L.key_id.in_(query.key_ids))
    if query.models:
        statement = statement.where(L.requested_model.in_(query.models))
    return [dict(row._mapping) for row in await session.execute(statement)]
