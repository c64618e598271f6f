"""The usage-sum toolkit: the ledger summed in SQL, per (account, ledger kind, model, price
version), for any set of usage periods and `recorded_at` windows.

The ledger is never read row by row here. A month's usage is summed per (account, ledger
kind, model, price version) from `usage_rollup` (the priced rows outside quoted tasks
recorded up to its watermark, kept by a background job) plus the ledger rows the rollup
does not hold: those recorded since its watermark, those without a price, and those of
quoted tasks (whose billing depends on when each row occurred and was recorded). Any other
window (late usage, a month invoiced again after a void) is summed from the ledger, joined
to a small table of `recorded_at` windows (see `pricing.invoice`). `occurred_at` is always
bounded by constants, so Postgres prunes the monthly partitions. Rows stored without a
price are summed a second time, cut by the spans of their model's price timeline, so each
span is priced by the version then in force.

A quoted task covers the rows under its id that occurred from its acceptance on: they are
never billed as tokens (see `tasks`).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

from sqlalchemy import (
    ARRAY,
    BigInteger,
    DateTime,
    String,
    and_,
    any_,
    bindparam,
    column,
    exists,
    func,
    or_,
    select,
)
from sqlalchemy.dialects.postgresql import UUID
from sqlalchemy.sql import FromClause
from sqlalchemy.sql.elements import ColumnElement

from pricing.invoice import BilledWindow, UsageTotals
from pricing.prices import PriceSegment
from service.db.models import Task, UsageRecord
from service.db.repository import Repository

L = UsageRecord

UUIDS = ARRAY(UUID(as_uuid=True))
TIMES = ARRAY(DateTime(timezone=True))
TEXTS = ARRAY(String())


@dataclass(frozen=True, slots=True)
class Selection:
    """Rows of `account_id` that occurred in `period` and were recorded in `window`."""

    account_id: uuid.UUID
    period: str
    period_start: datetime
    period_end: datetime
    window: BilledWindow
    # Only the rows `usage_rollup` leaves out (no price version or no cost, or a quoted
    # task's): the others of the window are summed from the rollup instead.
    unrolled_only: bool = False


@dataclass(frozen=True, slots=True)
class UsageSum:
    """One group of ledger rows. `bucket` is the usage period; for the rows of tasks, the
    task group: (completion period, outcome, task type, task model), after the usage period
    for late task rows."""

    account_id: uuid.UUID
    bucket: tuple[str | None, ...]
    ledger_kind: str
    model: str
    price_version_id: int | None
    unpriced: bool
    totals: UsageTotals
    stored_cost_usd: Decimal | None
    # Phase 2 only: which span of the model's price timeline the rows fall in.
    segment: int | None = None


def measures(c: Any) -> tuple[Any, ...]:
    # Cached tokens clamped per row, as `pricing.cost.countable_cached_tokens` does.
    cached = func.least(func.greatest(c.cached_tokens, 0), c.prompt_tokens)
    return (
        func.count().label("requests"),
        func.sum(c.prompt_tokens).label("prompt_tokens"),
        func.sum(c.completion_tokens).label("completion_tokens"),
        func.sum(cached).label("cached_tokens"),
        func.sum(c.cost_usd).label("cost_usd"),
    )


def _selection_table(selections: Sequence[Selection]) -> FromClause:
    return (
        func.unnest(
            bindparam("s_account", [s.account_id for s in selections], type_=UUIDS),
            bindparam("s_period", [s.period for s in selections], type_=TEXTS),
            bindparam("s_start", [s.period_start for s in selections], type_=TIMES),
            bindparam("s_end", [s.period_end for s in selections], type_=TIMES),
            bindparam("s_after", [s.window.after for s in selections], type_=TIMES),
            bindparam("s_until", [s.window.until for s in selections], type_=TIMES),
        )
        .table_valued(
            column("account_id", UUID(as_uuid=True)),
            column("period", String()),
            column("period_start", DateTime(timezone=True)),
            column("period_end", DateTime(timezone=True)),
            column("recorded_after", DateTime(timezone=True)),
            column("recorded_until", DateTime(timezone=True)),
        )
        .render_derived(name="sel")
    )


@dataclass(frozen=True, slots=True)
class _Source:
    rows: FromClause  # the ledger's columns, plus the task's for late task rows
    # Set when the source reads every account's rows (a bulk run): sums of other accounts
    # are dropped by the caller.
    accounts: frozenset[uuid.UUID] | None = None


_SOURCE_COLUMNS = (
    L.account_id,
    L.occurred_at,
    L.recorded_at,
    L.kind,
    L.requested_model,
    L.price_version_id,
    L.cost_usd,
    L.prompt_tokens,
    L.completion_tokens,
    L.cached_tokens,
)
# The rows `usage_rollup` leaves out; the same expression as the partial index's predicate,
# so Postgres finds them through it.
_UNROLLED = or_(L.price_version_id.is_(None), L.cost_usd.is_(None))
# Above this many accounts a month is read whole (one sequential, parallel scan of its
# partition) rather than account by account through the index.
BULK_ACCOUNTS = 100
# Which rows of a selection: "all"; those a quoted task "covers" (the caller subtracts
# them: keeping the big scan free of the anti-join lets Postgres read the month in
# parallel); the "unpriced" ones no quoted task covers (few: a partial index finds them);
# the "late_task" ones, of tasks billed at cost, recorded after they were billed.
RowFilter = Literal["all", "covered", "unpriced", "late_task"]


def of_quoted_task(c: Any) -> ColumnElement[bool]:
    # `task_id IS NOT NULL` lets Postgres reach the rows through the partial index
    # `ix_usage_ledger_account_task`, task by task, instead of scanning the month.
    return and_(
        c.task_id.is_not(None),
        Task.account_id == c.account_id,
        Task.external_id == c.task_id,
        Task.quote_id.is_not(None),
    )


def covers(c: Any) -> ColumnElement[bool]:
    """A quoted task covers the rows under its id that occurred from its acceptance on."""
    return and_(of_quoted_task(c), c.occurred_at >= Task.created_at)


def completion_period(completed_at: Any) -> Any:
    """`YYYY-MM` of a task's completion, in UTC whatever the session's zone."""
    return func.to_char(func.timezone("UTC", completed_at), "YYYY-MM")


# The task columns a late task row carries (grouped into the task's line).
_TASK_COLUMNS = (
    completion_period(Task.completed_at).label("t_period"),
    Task.status.label("t_outcome"),
    Task.task_type.label("t_type"),
    Task.model.label("t_model"),
)


def _sources(selections: Sequence[Selection], rows: RowFilter) -> Iterator[tuple[str, _Source]]:
    """The ledger rows of the selections (filtered by `rows`), a few sources per period.

    Each source bounds `occurred_at` (one partition) and `recorded_at` by constants, so
    Postgres prunes partitions and can use the index on `recorded_at` for late rows.
    When every account of the period has the same window (a month's own usage: all rows
    up to the cutoff), that is the whole filter. Otherwise (late usage, after a void) the
    candidate rows are read first and matched to each account's window by a join. What
    the rollup leaves out is read in two parts: the rows without a price (through the
    partial index) and the priced rows of quoted tasks (through the tasks).
    """
    by_period: dict[tuple[str, datetime, datetime, bool], list[Selection]] = {}
    for s in selections:
        key = (s.period, s.period_start, s.period_end, s.unrolled_only)
        by_period.setdefault(key, []).append(s)
    for (period, start, end, unrolled_only), group in by_period.items():
        parts = ("unpriced", "quoted_task") if unrolled_only else ("whole",)
        for part in parts:
            if part == "quoted_task" and rows == "unpriced":
                continue
            yield period, _source(group, start, end, part, rows)


def _source(
    group: Sequence[Selection], start: datetime, end: datetime, part: str, rows: RowFilter
) -> _Source:
    windows = {s.window for s in group}
    afters = [w.after for w in windows]
    lowest_after = None if None in afters else min(a for a in afters if a is not None)
    accounts = sorted({s.account_id for s in group})
    bulk = rows == "all" and part == "whole" and len(accounts) > BULK_ACCOUNTS
    source: FromClause = L.__table__
    where = [
        L.occurred_at >= start,
        L.occurred_at < end,
        L.recorded_at <= max(w.until for w in windows),
    ]
    if lowest_after is not None:
        where.append(L.recorded_at > lowest_after)
    if not bulk:
        where.append(L.account_id == any_(bindparam("accounts", accounts, type_=UUIDS)))
    if part == "unpriced":
        where.append(_UNROLLED)
    elif part == "quoted_task":
        source = source.join(Task.__table__, of_quoted_task(L))
        where.append(~_UNROLLED)
        if rows != "late_task":
            # A task accepted before the month began covers all its rows of the month: the
            # rollup leaving them out is then exactly right. Only later ones can have rows
            # billed per token (sent before their acceptance) to read here.
            where.append(Task.created_at > start)
    joined = part == "quoted_task"
    if rows in ("covered", "late_task"):
        if joined:
            where.append(L.occurred_at >= Task.created_at)
        else:
            source = source.join(Task.__table__, covers(L))
    if rows == "unpriced":
        where += [L.cost_usd.is_(None), ~exists().where(covers(L))]
    columns: tuple[Any, ...] = _SOURCE_COLUMNS
    if rows == "late_task":
        where += [Task.billed_as == "cost", L.recorded_at > Task.billed_rows_until]
        columns += _TASK_COLUMNS
    scope = frozenset(accounts) if bulk else None
    selected = select(*columns).select_from(source).where(*where)
    if len(windows) == 1:
        return _Source(selected.subquery("r"), scope)
    candidates = selected.cte("candidates").prefix_with("MATERIALIZED")
    sel = _selection_table(group)
    c = candidates.c
    matched = (
        select(*c)
        .select_from(
            candidates.join(
                sel,
                and_(
                    c.account_id == sel.c.account_id,
                    or_(sel.c.recorded_after.is_(None), c.recorded_at > sel.c.recorded_after),
                    c.recorded_at <= sel.c.recorded_until,
                ),
            )
        )
        .subquery("r")
    )
    return _Source(matched, scope)


def segment_table(segments: dict[str, list[PriceSegment]]) -> FromClause:
    flat = [(model, i, s) for model, spans in segments.items() for i, s in enumerate(spans)]
    return (
        func.unnest(
            bindparam("g_model", [m for m, _, _ in flat], type_=TEXTS),
            bindparam("g_index", [i for _, i, _ in flat], type_=ARRAY(BigInteger())),
            bindparam("g_start", [s.start for _, _, s in flat], type_=TIMES),
            bindparam("g_end", [s.end for _, _, s in flat], type_=TIMES),
        )
        .table_valued(
            column("model", String()),
            column("segment", BigInteger()),
            column("span_start", DateTime(timezone=True)),
            column("span_end", DateTime(timezone=True)),
        )
        .render_derived(name="seg")
    )


def in_segment(c: Any, seg: FromClause) -> ColumnElement[bool]:
    return and_(
        c.requested_model == seg.c.model,
        or_(seg.c.span_start.is_(None), c.occurred_at >= seg.c.span_start),
        or_(seg.c.span_end.is_(None), c.occurred_at < seg.c.span_end),
    )


def totals_of(row: Any) -> UsageTotals:
    return UsageTotals(
        int(row.requests),
        int(row.prompt_tokens or 0),
        int(row.completion_tokens or 0),
        int(row.cached_tokens or 0),
    )


class UsageSumRepository(Repository):
    async def usage_sums(self, selections: Sequence[Selection]) -> list[UsageSum]:
        """Billable usage per (account, period, ledger kind, model, price version): all rows
        minus the rows quoted tasks cover (billed as tasks, never as tokens)."""
        gross = await self._sums(selections, "all")
        for key, (totals, cost) in (await self._sums(selections, "covered")).items():
            all_totals, all_cost = gross[key]
            remaining = None if all_cost is None else all_cost - (cost or Decimal(0))
            gross[key] = (all_totals - totals, remaining)
        return [
            UsageSum(account, (period,), kind, model, version, unpriced, totals, cost)
            for (period, account, kind, model, version, unpriced), (totals, cost) in gross.items()
            if totals.requests
        ]

    async def unpriced_usage_sums(
        self, selections: Sequence[Selection], segments: dict[str, list[PriceSegment]]
    ) -> list[UsageSum]:
        """The rows stored without a price, summed per span of their model's price timeline."""
        if not segments:
            return []
        sums = await self._sums(selections, "unpriced", segments)
        return [
            UsageSum(account, (period,), kind, model, None, True, totals, None, segment)
            for (period, account, kind, model, segment), (totals, _) in sums.items()
        ]

    async def late_task_sums(
        self,
        selections: Sequence[Selection],
        segments: dict[str, list[PriceSegment]] | None = None,
    ) -> list[UsageSum]:
        """Rows of tasks billed at cost that were recorded after the cutoff of the task's
        first finalized invoice: billed once each, by the invoice whose window holds them.
        `bucket`: (usage period, task period, outcome, task type, task model)."""
        if segments is not None and not segments:
            return []
        accounts = sorted({s.account_id for s in selections})
        if not await self._any_billed_at_cost(accounts):
            return []
        sums = await self._sums(selections, "late_task", segments)
        result = []
        for key, (totals, cost) in sums.items():
            period, account, task_period, outcome, task_type, task_model, model, *rest = key
            if segments is None:
                version, unpriced, segment = rest[0], bool(rest[1]), None
            else:
                version, unpriced, segment = None, True, int(rest[0])
            bucket = (period, task_period, outcome, task_type, task_model)
            stored = None if unpriced else cost
            result.append(
                UsageSum(
                    account, bucket, "usage", model, version, unpriced, totals, stored, segment
                )
            )
        return result

    async def _any_billed_at_cost(self, account_ids: Sequence[uuid.UUID]) -> bool:
        """Whether any of these accounts has a task billed at cost already invoiced: only
        such a task can have late rows."""
        found = await self.session.scalar(
            select(Task.id)
            .where(
                Task.account_id == any_(bindparam("accounts", list(account_ids), type_=UUIDS)),
                Task.billed_as == "cost",
                Task.billed_rows_until.is_not(None),
            )
            .limit(1)
        )
        return found is not None

    async def _sums(
        self,
        selections: Sequence[Selection],
        rows: RowFilter,
        segments: dict[str, list[PriceSegment]] | None = None,
    ) -> dict[tuple[Any, ...], tuple[UsageTotals, Decimal | None]]:
        """Sums keyed by (usage period, account, ledger kind or task columns, model, price
        version and unpriced | segment). A period is read in several parts (the rollup's
        complement, the rows since its watermark), so sums of one key are added up."""
        sums: dict[tuple[Any, ...], tuple[UsageTotals, Decimal | None]] = {}
        for period, source in _sources(selections, rows):
            c = source.rows.c
            keys: list[Any] = [c.account_id]
            if rows == "late_task":
                keys += [c.t_period, c.t_outcome, c.t_type, c.t_model]
            else:
                keys.append(c.kind)
            keys.append(c.requested_model)
            rows_from: FromClause = source.rows
            where: list[ColumnElement[bool]] = []
            if segments is not None:
                seg = segment_table(segments)
                rows_from = rows_from.join(seg, in_segment(c, seg))
                where.append(c.cost_usd.is_(None))
                keys.append(seg.c.segment)
            else:
                keys += [c.price_version_id, c.cost_usd.is_(None).label("unpriced")]
            result = await self.session.execute(
                select(*keys, *measures(c)).select_from(rows_from).where(*where).group_by(*keys)
            )
            for r in result:
                if source.accounts is not None and r.account_id not in source.accounts:
                    continue
                key = (period, *r[: len(keys)])
                totals, cost = totals_of(r), r.cost_usd
                if key in sums:
                    before, before_cost = sums[key]
                    totals = before + totals
                    cost = None if cost is None or before_cost is None else before_cost + cost
                sums[key] = (totals, cost)
        return sums
