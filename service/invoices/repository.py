"""Every invoice query: the ledger summed in SQL, tasks counted, invoices read and written.

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
never billed as tokens. It is billed as a task (`billable_tasks`); when that is at cost, its
rows recorded up to the cutoff of its first finalized invoice are in its task line
(`task_cost_usage`), and each later one is billed once, by the invoice whose usage window
holds it (`late_task_sums`).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal, cast

from sqlalchemy import (
    ARRAY,
    BigInteger,
    DateTime,
    String,
    Table,
    and_,
    any_,
    bindparam,
    column,
    delete,
    exists,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import UUID
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import selectinload
from sqlalchemy.sql import FromClause
from sqlalchemy.sql.elements import ColumnElement

from pricing.invoice import BilledWindow, UsageTotals
from pricing.prices import PriceSegment
from service.db.engine import tune_for_aggregation
from service.db.models import (
    Account,
    Invoice,
    InvoiceLine,
    InvoiceUsageWindow,
    Task,
    UsageRecord,
    UsageRollup,
    UsageRollupState,
)

L = UsageRecord

INVOICES = cast(Table, Invoice.__table__)
LINES = cast(Table, InvoiceLine.__table__)
WINDOWS = cast(Table, InvoiceUsageWindow.__table__)

UUIDS = ARRAY(UUID(as_uuid=True))
TIMES = ARRAY(DateTime(timezone=True))
TEXTS = ARRAY(String())

# The ledger writers' advisory lock (migration 0003): the trigger `usage_ledger_write`
# takes it, shared, before every INSERT statement on the ledger, until that transaction ends.
LEDGER_WRITE_LOCK = (1296387148, 1)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


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


@dataclass(frozen=True, slots=True)
class BillableTask:
    """A completed quoted task that no finalized invoice bills yet."""

    id: uuid.UUID
    account_id: uuid.UUID
    period: str  # the month it completed (or expired) in
    outcome: str
    billed_as: str
    task_type: str | None
    model: str | None
    fixed_price_usd: Decimal | None


@dataclass(frozen=True, slots=True)
class LedgerWriter:
    """An open transaction that has written the ledger (the oldest holds back the cutoff)."""

    pid: int
    application_name: str | None
    xact_start: datetime | None  # None: started by a role whose activity this one cannot see


@dataclass(frozen=True, slots=True)
class UnpricedRow:
    account_id: uuid.UUID
    model: str
    totals: UsageTotals
    first_occurred_at: datetime
    last_occurred_at: datetime
    segment: int | None = None


def _measures(c: Any) -> tuple[Any, ...]:
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


def _of_quoted_task(c: Any) -> ColumnElement[bool]:
    # `task_id IS NOT NULL` lets Postgres reach the rows through the partial index
    # `ix_usage_ledger_account_task`, task by task, instead of scanning the month.
    return and_(
        c.task_id.is_not(None),
        Task.account_id == c.account_id,
        Task.external_id == c.task_id,
        Task.quote_id.is_not(None),
    )


def _covers(c: Any) -> ColumnElement[bool]:
    """A quoted task covers the rows under its id that occurred from its acceptance on."""
    return and_(_of_quoted_task(c), c.occurred_at >= Task.created_at)


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
    Postgres prunes partitions and can use the BRIN index on `recorded_at` for late rows.
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
        source = source.join(Task.__table__, _of_quoted_task(L))
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
            source = source.join(Task.__table__, _covers(L))
    if rows == "unpriced":
        where += [L.cost_usd.is_(None), ~exists().where(_covers(L))]
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


def _segment_table(segments: dict[str, list[PriceSegment]]) -> FromClause:
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


def _in_segment(c: Any, seg: FromClause) -> ColumnElement[bool]:
    return and_(
        c.requested_model == seg.c.model,
        or_(seg.c.span_start.is_(None), c.occurred_at >= seg.c.span_start),
        or_(seg.c.span_end.is_(None), c.occurred_at < seg.c.span_end),
    )


def _totals(row: Any) -> UsageTotals:
    return UsageTotals(
        int(row.requests),
        int(row.prompt_tokens or 0),
        int(row.completion_tokens or 0),
        int(row.cached_tokens or 0),
    )


# Rows recorded in (since, until] with a price version and a cost, summed into the rollup.
# Postgres cannot prune partitions by `recorded_at`, but each partition's BRIN index on it
# skips all but its newest blocks (and a month's late rows).
ROLL_UP = text(
    """
    WITH batch AS (
        SELECT to_char(month, 'YYYY-MM') AS period, account_id, kind, requested_model,
               price_version_id, task_id, requests, prompt_tokens, completion_tokens,
               cached_tokens, cost_usd
        FROM (
            SELECT date_trunc('month', occurred_at AT TIME ZONE 'UTC') AS month, account_id,
                   kind, requested_model, price_version_id, coalesce(task_id, '') AS task_id,
                   count(*) AS requests, sum(prompt_tokens) AS prompt_tokens,
                   sum(completion_tokens) AS completion_tokens,
                   sum(least(greatest(cached_tokens, 0), prompt_tokens)) AS cached_tokens,
                   sum(cost_usd) AS cost_usd
            FROM usage_ledger
            WHERE recorded_at > :since AND recorded_at <= :until
              AND price_version_id IS NOT NULL AND cost_usd IS NOT NULL
            GROUP BY 1, 2, 3, 4, 5, 6
        ) grouped
    ), merged AS (
        INSERT INTO usage_rollup AS r (period, account_id, kind, requested_model,
            price_version_id, task_id, requests, prompt_tokens, completion_tokens,
            cached_tokens, cost_usd)
        SELECT * FROM batch
        ON CONFLICT (period, account_id, kind, requested_model, price_version_id, task_id)
        DO UPDATE SET requests = r.requests + excluded.requests,
                      prompt_tokens = r.prompt_tokens + excluded.prompt_tokens,
                      completion_tokens = r.completion_tokens + excluded.completion_tokens,
                      cached_tokens = r.cached_tokens + excluded.cached_tokens,
                      cost_usd = r.cost_usd + excluded.cost_usd
    )
    SELECT coalesce(sum(requests), 0) FROM batch
    """
)


class InvoiceRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    # -- accounts, cutoff ------------------------------------------------------------------

    async def lock_accounts(self, account_ids: Sequence[uuid.UUID]) -> list[uuid.UUID]:
        """Serialise invoice work per account; returns the accounts that exist.

        FOR NO KEY UPDATE, not FOR UPDATE: new keys and invoices referencing the account
        (foreign keys take KEY SHARE) are not held up.
        """
        rows = await self.session.scalars(
            select(Account.id)
            .where(Account.id == any_(bindparam("ids", list(account_ids), type_=UUIDS)))
            .order_by(Account.id)
            .with_for_update(key_share=True)
        )
        return list(rows)

    async def account_ids(self, created_before: datetime) -> list[uuid.UUID]:
        rows = await self.session.scalars(
            select(Account.id).where(Account.created_at < created_before).order_by(Account.id)
        )
        return list(rows)

    async def tune_for_aggregation(self) -> None:
        await tune_for_aggregation(self.session)

    async def usage_cutoff(self) -> datetime:
        """The latest instant up to which every ledger row is committed.

        A row's `recorded_at` is the time of its insert, taken after its statement took the
        ledger writers' shared advisory lock (trigger `usage_ledger_write`), which its
        transaction then holds until it ends. So a row recorded before the oldest open
        transaction holding that lock began is committed, and a transaction that has not
        written yet will stamp its rows later than now: the cutoff stops just before the
        oldest open ledger-writing transaction, and other sessions (a `psql` left in BEGIN,
        a long report) never hold it back. The clock is read before the locks, so a writer
        that starts in between stamps its rows after it. A writer of another role whose
        start this role may not read (no pg_read_all_stats) stops the cutoff altogether.
        """
        clock: datetime = (await self.session.execute(select(func.clock_timestamp()))).scalar_one()
        writer = await self.oldest_ledger_writer()
        cutoff = clock
        if writer is not None:
            cutoff = min(cutoff, writer.xact_start or _EPOCH)
        return cutoff - timedelta(microseconds=1)

    async def oldest_ledger_writer(self) -> LedgerWriter | None:
        """The open transaction (other than this one) that began first among those holding
        the ledger writers' lock. Only the backend status snapshot taken first in a
        transaction is fresh, hence the clear."""
        await self.session.execute(text("SELECT pg_stat_clear_snapshot()"))
        row = (
            await self.session.execute(
                text(
                    "SELECT k.pid, a.application_name, a.xact_start FROM pg_locks k"
                    " LEFT JOIN pg_stat_activity a ON a.pid = k.pid"
                    " WHERE k.locktype = 'advisory' AND k.granted"
                    " AND k.database = (SELECT oid FROM pg_database"
                    "   WHERE datname = current_database())"
                    " AND k.classid = :lock_class AND k.objid = :lock_id AND k.objsubid = 2"
                    " AND k.pid <> pg_backend_pid()"
                    " ORDER BY a.xact_start NULLS FIRST LIMIT 1"
                ),
                {"lock_class": LEDGER_WRITE_LOCK[0], "lock_id": LEDGER_WRITE_LOCK[1]},
            )
        ).first()
        if row is None:
            return None
        return LedgerWriter(row.pid, row.application_name, row.xact_start)

    # -- the ledger, summed ----------------------------------------------------------------

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
                seg = _segment_table(segments)
                rows_from = rows_from.join(seg, _in_segment(c, seg))
                where.append(c.cost_usd.is_(None))
                keys.append(seg.c.segment)
            else:
                keys += [c.price_version_id, c.cost_usd.is_(None).label("unpriced")]
            result = await self.session.execute(
                select(*keys, *_measures(c)).select_from(rows_from).where(*where).group_by(*keys)
            )
            for r in result:
                if source.accounts is not None and r.account_id not in source.accounts:
                    continue
                key = (period, *r[: len(keys)])
                totals, cost = _totals(r), r.cost_usd
                if key in sums:
                    before, before_cost = sums[key]
                    totals = before + totals
                    cost = None if cost is None or before_cost is None else before_cost + cost
                sums[key] = (totals, cost)
        return sums

    # -- the rollup ------------------------------------------------------------------------

    async def rolled_up_to(self) -> datetime:
        """The rollup's watermark, share-locked for this transaction: the background job
        cannot move it (and add rows) until this transaction ends, so the rollup and the
        ledger rows read after it are summed consistently."""
        statement = select(UsageRollupState.rolled_up_to).where(UsageRollupState.id == 1)
        at: datetime = (
            await self.session.execute(statement.with_for_update(read=True))
        ).scalar_one()
        return at

    async def rollup_sums(self, account_ids: Sequence[uuid.UUID], period: str) -> list[UsageSum]:
        """The rollup's usage of `period` per (account, kind, model, version), quoted tasks'
        rows left out (billed as tasks)."""
        R = UsageRollup
        quoted = exists().where(
            Task.account_id == R.account_id,
            Task.external_id == R.task_id,
            Task.quote_id.is_not(None),
        )
        where = [R.period == period, or_(R.task_id == "", ~quoted)]
        bulk = len(account_ids) > BULK_ACCOUNTS
        if not bulk:
            where.append(
                R.account_id == any_(bindparam("accounts", list(account_ids), type_=UUIDS))
            )
        keys = (R.account_id, R.kind, R.requested_model, R.price_version_id)
        rows = await self.session.execute(
            select(
                *keys,
                func.sum(R.requests).label("requests"),
                func.sum(R.prompt_tokens).label("prompt_tokens"),
                func.sum(R.completion_tokens).label("completion_tokens"),
                func.sum(R.cached_tokens).label("cached_tokens"),
                func.sum(R.cost_usd).label("cost_usd"),
            )
            .where(*where)
            .group_by(*keys)
        )
        wanted = set(account_ids)
        return [
            UsageSum(
                r.account_id,
                (period,),
                r.kind,
                r.requested_model,
                r.price_version_id,
                False,
                _totals(r),
                r.cost_usd,
            )
            for r in rows
            if r.account_id in wanted
        ]

    async def roll_up(self, wait: bool = True) -> tuple[datetime, datetime, int] | None:
        """Add the priced ledger rows recorded since the watermark to the rollup, in this
        transaction; returns (from, to, ledger rows added), or None when another
        transaction is rolling up (with `wait=False`)."""
        statement = select(UsageRollupState.rolled_up_to).where(UsageRollupState.id == 1)
        statement = statement.with_for_update(skip_locked=not wait)
        since: datetime | None = await self.session.scalar(statement)
        if since is None:
            return None
        until = await self.usage_cutoff()
        if until <= since:
            return since, since, 0
        added = int(
            (await self.session.execute(ROLL_UP, {"since": since, "until": until})).scalar_one()
        )
        await self.session.execute(
            update(UsageRollupState).where(UsageRollupState.id == 1).values(rolled_up_to=until)
        )
        return since, until, added

    # -- quoted tasks ----------------------------------------------------------------------

    async def billable_tasks(
        self, account_ids: Sequence[uuid.UUID], before: datetime
    ) -> list[BillableTask]:
        """Completed quoted tasks no finalized invoice bills, completed before `before`
        (the caller keeps those of its period and of the earlier finalized months)."""
        period = completion_period(Task.completed_at)
        rows = await self.session.execute(
            select(
                Task.id,
                Task.account_id,
                period.label("period"),
                Task.status,
                Task.billed_as,
                Task.task_type,
                Task.model,
                Task.fixed_price_usd,
            ).where(
                Task.account_id == any_(bindparam("accounts", list(account_ids), type_=UUIDS)),
                Task.quote_id.is_not(None),
                Task.status != "open",
                Task.billed_invoice_id.is_(None),
                Task.completed_at < before,
            )
        )
        return [
            BillableTask(
                r.id,
                r.account_id,
                r.period,
                r.status,
                r.billed_as,
                r.task_type,
                r.model,
                r.fixed_price_usd,
            )
            for r in rows
        ]

    async def task_cost_usage(
        self,
        task_ids: Sequence[uuid.UUID],
        cutoff: datetime,
        segments: dict[str, list[PriceSegment]] | None = None,
    ) -> list[UsageSum]:
        """The rows tasks billed at cost cover, for their task lines: those recorded up to the
        cutoff of the task's first finalized invoice (kept through voids), else up to
        `cutoff`; per (completion period, outcome, task type, task model) and model and
        version (or span of the model's price timeline, for rows stored without a price)."""
        if not task_ids or (segments is not None and not segments):
            return []
        source = L.__table__.join(Task.__table__, _covers(L))
        where = [
            Task.id == any_(bindparam("tasks", list(task_ids), type_=UUIDS)),
            L.recorded_at <= func.coalesce(Task.billed_rows_until, cutoff),
        ]
        period = completion_period(Task.completed_at).label("period")
        keys: list[Any] = [L.account_id, period, Task.status, Task.task_type, Task.model]
        keys.append(L.requested_model)
        if segments is not None:
            seg = _segment_table(segments)
            source = source.join(seg, _in_segment(L, seg))
            where.append(L.cost_usd.is_(None))
            keys.append(seg.c.segment)
        else:
            keys += [L.price_version_id, L.cost_usd.is_(None).label("unpriced")]
        rows = await self.session.execute(
            select(*keys, *_measures(L)).select_from(source).where(*where).group_by(*keys)
        )
        sums = []
        for r in rows:
            unpriced = segments is not None or bool(r.unpriced)
            sums.append(
                UsageSum(
                    r.account_id,
                    (r.period, r.status, r.task_type, r.model),
                    "usage",
                    r.requested_model,
                    None if segments is not None else r.price_version_id,
                    unpriced,
                    _totals(r),
                    None if unpriced else r.cost_usd,
                    int(r.segment) if segments is not None else None,
                )
            )
        return sums

    async def mark_tasks_billed(
        self, invoice_id: uuid.UUID, task_ids: Sequence[uuid.UUID], cutoff: datetime
    ) -> None:
        """The finalized invoice bills these tasks; the first billing's cutoff stays."""
        if not task_ids:
            return
        await self.session.execute(
            update(Task)
            .where(Task.id == any_(bindparam("tasks", list(task_ids), type_=UUIDS)))
            .values(
                billed_invoice_id=invoice_id,
                billed_rows_until=func.coalesce(Task.billed_rows_until, cutoff),
            )
        )

    async def release_tasks(self, invoice_id: uuid.UUID) -> None:
        """A voided invoice bills nothing: its tasks go on the next invoice of their month."""
        await self.session.execute(
            update(Task).where(Task.billed_invoice_id == invoice_id).values(billed_invoice_id=None)
        )

    # -- the unpriced-usage report ---------------------------------------------------------

    async def unpriced_rows(
        self,
        start: datetime,
        end: datetime,
        account_id: uuid.UUID | None,
        segments: dict[str, list[PriceSegment]] | None = None,
    ) -> list[UnpricedRow]:
        """Rows of [start, end) stored without a price, per account and model (and span)."""
        where = [L.occurred_at >= start, L.occurred_at < end, L.cost_usd.is_(None)]
        if account_id is not None:
            where.append(L.account_id == account_id)
        source: FromClause = L.__table__
        keys: tuple[Any, ...] = (L.account_id, L.requested_model)
        if segments is not None:
            seg = _segment_table(segments)
            source = source.join(seg, _in_segment(L, seg))
            keys = (*keys, seg.c.segment)
        rows = await self.session.execute(
            select(
                *keys,
                *_measures(L),
                func.min(L.occurred_at).label("first"),
                func.max(L.occurred_at).label("last"),
            )
            .select_from(source)
            .where(*where)
            .group_by(*keys)
            .order_by(*keys)
        )
        return [
            UnpricedRow(
                r.account_id,
                r.requested_model,
                _totals(r),
                r.first,
                r.last,
                int(r.segment) if segments is not None else None,
            )
            for r in rows
        ]

    # -- invoices --------------------------------------------------------------------------

    async def live_invoices(
        self, account_ids: Sequence[uuid.UUID], period: str
    ) -> dict[uuid.UUID, Invoice]:
        """The draft or finalized invoice of each account for `period`."""
        rows = await self.session.scalars(
            select(Invoice).where(
                Invoice.account_id == any_(bindparam("accounts", list(account_ids), type_=UUIDS)),
                Invoice.period == period,
                Invoice.status != "void",
            )
        )
        return {invoice.account_id: invoice for invoice in rows}

    async def billed_windows(
        self, account_ids: Sequence[uuid.UUID]
    ) -> dict[uuid.UUID, dict[str, list[BilledWindow]]]:
        """The windows finalized invoices bill, per account and usage period."""
        rows = await self.session.execute(
            select(
                Invoice.account_id,
                InvoiceUsageWindow.period,
                InvoiceUsageWindow.recorded_after,
                InvoiceUsageWindow.recorded_until,
            )
            .join(Invoice, Invoice.id == InvoiceUsageWindow.invoice_id)
            .where(
                Invoice.account_id == any_(bindparam("accounts", list(account_ids), type_=UUIDS)),
                Invoice.status == "finalized",
            )
        )
        billed: dict[uuid.UUID, dict[str, list[BilledWindow]]] = {}
        for r in rows:
            windows = billed.setdefault(r.account_id, {}).setdefault(r.period, [])
            windows.append(BilledWindow(r.recorded_after, r.recorded_until))
        return billed

    async def finalized_periods(
        self, account_ids: Sequence[uuid.UUID]
    ) -> dict[uuid.UUID, set[str]]:
        rows = await self.session.execute(
            select(Invoice.account_id, Invoice.period).where(
                Invoice.account_id == any_(bindparam("accounts", list(account_ids), type_=UUIDS)),
                Invoice.status == "finalized",
            )
        )
        periods: dict[uuid.UUID, set[str]] = {}
        for r in rows:
            periods.setdefault(r.account_id, set()).add(r.period)
        return periods

    async def insert_invoices(self, values: list[dict[str, Any]]) -> dict[uuid.UUID, uuid.UUID]:
        """New drafts; returns account id → invoice id."""
        if not values:
            return {}
        rows = await self.session.execute(
            insert(INVOICES).returning(Invoice.id, Invoice.account_id), values
        )
        return {r.account_id: r.id for r in rows}

    async def update_drafts(self, values: list[dict[str, Any]]) -> None:
        """Refresh existing drafts (each dict carries `b_id`) and drop their old lines."""
        if not values:
            return
        table = INVOICES
        await self.session.execute(
            update(table)
            .where(table.c.id == bindparam("b_id"), table.c.status == "draft")
            .values(
                total_usd=bindparam("total_usd"),
                usage_cutoff=bindparam("usage_cutoff"),
                unpriced_usage=bindparam("unpriced_usage"),
                updated_at=func.now(),
            ),
            values,
        )
        ids = [v["b_id"] for v in values]
        await self.delete_contents(ids)

    async def delete_contents(self, invoice_ids: Iterable[uuid.UUID]) -> None:
        ids = bindparam("ids", list(invoice_ids), type_=UUIDS)
        await self.session.execute(delete(LINES).where(LINES.c.invoice_id == any_(ids)))
        await self.session.execute(delete(WINDOWS).where(WINDOWS.c.invoice_id == any_(ids)))

    async def insert_lines(self, values: list[dict[str, Any]]) -> None:
        await self._copy(LINES, values)

    async def insert_windows(self, values: list[dict[str, Any]]) -> None:
        await self._copy(WINDOWS, values)

    async def _copy(self, table: Table, values: list[dict[str, Any]]) -> None:
        """COPY into `table` in this session's transaction: a bulk run writes tens of
        thousands of lines, which row-by-row INSERTs would take seconds to."""
        if not values:
            return
        columns = list(values[0])
        connection = await (await self.session.connection()).get_raw_connection()
        await connection.driver_connection.copy_records_to_table(  # type: ignore[union-attr]
            table.name, records=[tuple(v[c] for c in columns) for v in values], columns=columns
        )

    async def get(self, invoice_id: uuid.UUID, lock: bool = False) -> Invoice | None:
        statement = (
            select(Invoice)
            .where(Invoice.id == invoice_id)
            .options(selectinload(Invoice.lines))
            .execution_options(populate_existing=True)
        )
        if lock:
            statement = statement.with_for_update(of=Invoice)
        invoice: Invoice | None = await self.session.scalar(statement)
        return invoice

    async def get_many(self, invoice_ids: Sequence[uuid.UUID]) -> list[Invoice]:
        rows = await self.session.scalars(
            select(Invoice)
            .where(Invoice.id == any_(bindparam("ids", list(invoice_ids), type_=UUIDS)))
            .options(selectinload(Invoice.lines))
            .execution_options(populate_existing=True)
            .order_by(Invoice.account_id)
        )
        return list(rows)

    async def account_of(self, invoice_id: uuid.UUID) -> uuid.UUID | None:
        account: uuid.UUID | None = await self.session.scalar(
            select(Invoice.account_id).where(Invoice.id == invoice_id)
        )
        return account

    async def list(
        self,
        account_id: uuid.UUID | None,
        period: str | None,
        status: str | None,
        limit: int,
        after: tuple[str, uuid.UUID] | None,
    ) -> list[Invoice]:
        """Newest period first, then by id; `after` is the (period, id) of the previous page."""
        statement = select(Invoice).options(selectinload(Invoice.lines))
        if account_id is not None:
            statement = statement.where(Invoice.account_id == account_id)
        if period is not None:
            statement = statement.where(Invoice.period == period)
        if status is not None:
            statement = statement.where(Invoice.status == status)
        if after is not None:
            statement = statement.where(
                or_(
                    Invoice.period < after[0],
                    and_(Invoice.period == after[0], Invoice.id > after[1]),
                )
            )
        statement = statement.order_by(Invoice.period.desc(), Invoice.id).limit(limit)
        return list(await self.session.scalars(statement))

    async def next_number(self, year: int) -> int:
        """The next invoice number of `year`. The counter row stays locked until commit, so
        numbers are handed out in commit order, and a rolled-back finalization gives its
        number back: the sequence has no gaps."""
        number: int = (
            await self.session.execute(
                text(
                    "INSERT INTO invoice_number_counters (year, last_number) VALUES (:year, 1)"
                    " ON CONFLICT (year) DO UPDATE"
                    " SET last_number = invoice_number_counters.last_number + 1"
                    " RETURNING last_number"
                ),
                {"year": year},
            )
        ).scalar_one()
        return number

    async def mark_finalized(self, invoice_id: uuid.UUID, number: str, at: datetime) -> None:
        await self.session.execute(
            update(Invoice)
            .where(Invoice.id == invoice_id, Invoice.status == "draft")
            .values(status="finalized", number=number, finalized_at=at, updated_at=func.now())
        )

    async def mark_void(self, invoice_id: uuid.UUID, reason: str, at: datetime) -> None:
        await self.session.execute(
            update(Invoice)
            .where(Invoice.id == invoice_id, Invoice.status == "finalized")
            .values(status="void", void_reason=reason, voided_at=at, updated_at=func.now())
        )

    async def now(self) -> datetime:
        at: datetime = (await self.session.execute(select(func.now()))).scalar_one()
        return at
