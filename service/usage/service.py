"""Usage as a customer or finance sees it: totals by any dimension, and the raw rows."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from operator import add
from typing import Any

from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncSession

from service.auth.principal import Principal
from service.db.models import UsageRecord
from service.errors import NotFound, Unprocessable
from service.parts import HeldBreakdowns
from service.schemas import Page, decode_cursor, keyset_page
from service.usage.repository import (
    MAX_BREAKDOWN,
    TOTAL_FIELDS,
    Breakdowns,
    UsageFilter,
    UsageRepository,
)
from service.usage.schemas import (
    GROUP_FIELDS,
    GROUPS,
    GroupBy,
    UsageEvent,
    UsageGroup,
    UsageReport,
    UsageTotals,
)

# The totals every row has.
TOTALS = frozenset(UsageTotals.model_fields)


def parse_group_by(value: str | None) -> list[GroupBy]:
    """`day,model` → ["day", "model"]; an unknown name is a 422 naming `group_by`."""
    if not value:
        return []
    by_name: dict[str, GroupBy] = {group: group for group in GROUPS}
    names = [part.strip() for part in value.split(",") if part.strip()]
    unknown = [name for name in names if name not in by_name]
    if unknown:
        raise Unprocessable(
            f"query.group_by: unknown group {', '.join(map(repr, unknown))};"
            f" use any of {', '.join(GROUPS)}",
            param="query.group_by",
        )
    # In the order asked, each once.
    return [by_name[name] for name in dict.fromkeys(names)]


async def scoped_filter(
    session: AsyncSession,
    principal: Principal,
    *,
    account_id: uuid.UUID | None,
    key_id: uuid.UUID | None,
    task_id: str | None,
    model: str | None,
    start: datetime | None,
    end: datetime | None,
) -> UsageFilter:
    """The caller's filters, limited to what it may see.

    A customer key is confined to its own account: naming another account, or a key of
    one, is a 404 as for any object it cannot see. A key filter also pins the key's
    account, so the query can use the (account_id, occurred_at) index.
    """
    if start is not None and end is not None and end <= start:
        raise Unprocessable("query.end: must be after start", param="query.end")
    account_id = principal.scope(account_id)
    if key_id is not None:
        owner = await UsageRepository(session).key_account(key_id)
        if owner is None or not (principal.is_admin or owner == principal.account_id):
            raise NotFound(f"key {key_id} not found", param="query.key_id")
        # An admin naming an account and another account's key simply gets no rows.
        account_id = account_id or owner
    return UsageFilter(
        account_id=account_id,
        key_id=key_id,
        task_id=task_id,
        model=model,
        start=start,
        end=end,
    )


async def usage_report(
    session: AsyncSession, where: UsageFilter, group_by: Sequence[GroupBy], limit: int
) -> UsageReport:
    rows = await UsageRepository(session).aggregate(where, group_by, limit)
    # Built from the row's own columns: only the requested group fields are "set", and
    # the endpoint leaves the others out of the JSON.
    data = [UsageGroup(**row._asdict()) for row in rows[:limit]]
    return UsageReport(data=data, has_more=len(rows) > limit)


async def usage_breakdowns(
    session: AsyncSession,
    where: UsageFilter,
    groupings: Sequence[Sequence[GroupBy]],
    cache: HeldBreakdowns | None = None,
) -> list[list[UsageGroup]]:
    """The range's totals by each of several groupings (every group, in no order): what a
    dashboard shows side by side. Where the daily rollup answers, one pass over it (held in
    `cache` when given) and one over the ledger rows recorded since its watermark."""
    if not groupings:
        return []
    repository = UsageRepository(session)
    if not repository.breakdowns_from_rollup(where, groupings):
        found = [await repository.aggregate(where, g, MAX_BREAKDOWN) for g in groupings]
        return [_groups(g, rows) for g, rows in zip(groupings, found, strict=True)]
    key = (where, tuple(tuple(g) for g in groupings))
    rolled_up: Breakdowns | None = cache.get(key) if cache is not None else None
    if rolled_up is None:
        rolled_up = await repository.rolled_up_breakdowns(where, groupings)
    tail = await repository.breakdowns_since(where, groupings, rolled_up.watermark)
    if cache is not None:
        tail_rows = sum(totals[0] for totals in tail.groups[0].values())
        if tail_rows > cache.tail_rows and tail.watermark > rolled_up.watermark:
            cache.drop(key)  # the next read takes the rollup as folded since
        else:
            cache.put(key, rolled_up)
    return [
        _added(grouping, rolled, recent)
        for grouping, rolled, recent in zip(groupings, rolled_up.groups, tail.groups, strict=True)
    ]


def _added(
    grouping: Sequence[GroupBy],
    rolled: dict[tuple[Any, ...], tuple[Any, ...]],
    recent: dict[tuple[Any, ...], tuple[Any, ...]],
) -> list[UsageGroup]:
    """One grouping's groups from the rollup and from the ledger's tail, added up exactly
    (integers and Decimals) where a group is in both."""
    fields = [GROUP_FIELDS[g] for g in dict.fromkeys(grouping)]
    sums = dict(rolled)
    for group, totals in recent.items():
        found = sums.get(group)
        sums[group] = totals if found is None else tuple(map(add, found, totals))
    # Built without validation: every value comes typed from Postgres (bigint, numeric,
    # date, uuid, text), and validating the thousand or so groups of an overview took a
    # quarter of its time. The fields set are the same as the constructor's.
    return [
        UsageGroup.model_construct(
            **dict(zip(fields, group, strict=True)), **dict(zip(TOTAL_FIELDS, totals, strict=True))
        )
        for group, totals in sums.items()
    ]


def _groups(grouping: Sequence[GroupBy], rows: Sequence[Row[Any]]) -> list[UsageGroup]:
    fields = {GROUP_FIELDS[g] for g in grouping}
    return [
        UsageGroup(**{k: v for k, v in row._asdict().items() if k in fields or k in TOTALS})
        for row in rows
    ]


def _event(row: UsageRecord) -> UsageEvent:
    fields = {name: getattr(row, name) for name in UsageEvent.model_fields if name != "model"}
    return UsageEvent(**fields, model=row.requested_model)


async def usage_events(
    session: AsyncSession, where: UsageFilter, limit: int, cursor: str | None
) -> Page[UsageEvent]:
    after = decode_cursor(cursor, datetime, str) if cursor else None
    rows = await UsageRepository(session).events(where, limit, after)
    return keyset_page(
        Page[UsageEvent], rows, limit, _event, lambda e: (e.occurred_at.isoformat(), e.request_id)
    )
