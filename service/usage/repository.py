"""Usage queries: aggregation and raw rows, all in SQL over the partitioned ledger.

Every query bounds `occurred_at` when the caller does and filters `account_id` when known,
so Postgres prunes the monthly partitions and walks the (account_id, occurred_at) index.

Totals over whole UTC days that need no task id are read from `usage_daily` (every row
recorded up to its watermark, summed per day and dimension) plus the ledger rows recorded
since, in one statement, so one snapshot sees the rollup and its watermark together: a
month of a million rows is summed from a few thousand.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

from sqlalchemy import (
    BigInteger,
    Date,
    DateTime,
    Numeric,
    Select,
    Text,
    bindparam,
    case,
    cast,
    func,
    literal,
    select,
    text,
    true,
    tuple_,
    type_coerce,
    union_all,
    update,
)
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.elements import ColumnElement

from service.db.models import ApiKey, UsageDaily, UsageDailyState, UsageRecord
from service.db.repository import Repository, constant
from service.invoices.repository.cutoff import CutoffRepository
from service.reports.repository import text_cell_sql
from service.usage.schemas import EVENT_FIELDS, GroupBy

L = UsageRecord
D = UsageDaily
# What `usage_daily` stores for a row without a key (a key column cannot be NULL).
NO_KEY = uuid.UUID(int=0)


def _utc(column: Any) -> Any:
    return func.timezone("UTC", column)


# group_by name → (output field, SQL expression).
GROUP_EXPRESSIONS: dict[GroupBy, tuple[str, Any]] = {
    "day": ("day", cast(_utc(L.occurred_at), Date)),
    "month": ("month", func.to_char(_utc(L.occurred_at), literal("YYYY-MM"))),
    "account": ("account_id", L.account_id),
    "model": ("model", L.requested_model),
    "key": ("key_id", L.key_id),
    "task": ("task_id", L.task_id),
    "task_type": ("task_type", L.task_type),
    "provider": ("provider", L.provider),
    "status": ("status_code", L.status_code),
}

TOTALS = (
    func.count().label("requests"),
    func.coalesce(func.sum(L.prompt_tokens), 0).label("prompt_tokens"),
    func.coalesce(func.sum(L.completion_tokens), 0).label("completion_tokens"),
    func.coalesce(func.sum(L.total_tokens), 0).label("total_tokens"),
    func.coalesce(func.sum(L.cached_tokens), 0).label("cached_tokens"),
    func.coalesce(func.sum(L.reasoning_tokens), 0).label("reasoning_tokens"),
    # NUMERIC sum: exact. Unpriced rows (NULL cost) add nothing and are counted apart.
    func.coalesce(func.sum(L.cost_usd), 0).label("cost_usd"),
    func.count().filter(L.cost_usd.is_(None)).label("unpriced_requests"),
)


# The groups `usage_daily` can answer, as (output field, the column it is read from).
DAILY_GROUPS: dict[GroupBy, tuple[str, str]] = {
    "day": ("day", "day"),
    "month": ("month", "day"),
    "account": ("account_id", "account_id"),
    "model": ("model", "requested_model"),
    "key": ("key_id", "key_id"),
    "task_type": ("task_type", "task_type"),
    "provider": ("provider", "provider"),
    "status": ("status_code", "status_code"),
}
# Most groups a breakdown returns per grouping when it falls back to one query each.
MAX_BREAKDOWN = 100_000


@dataclass(frozen=True, slots=True)
class Breakdowns:
    """Per grouping, its groups (the values of its fields, in the grouping's order) with
    their totals (in `TOTAL_FIELDS` order); and the rollup's watermark when they were read."""

    watermark: datetime
    groups: list[dict[tuple[Any, ...], tuple[Any, ...]]]


MEASURES = (
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",
    "reasoning_tokens",
)
TOTAL_FIELDS = (*MEASURES, "cost_usd", "unpriced_requests")

ROLL_UP_DAILY = text(
    """
    WITH batch AS (
        SELECT (occurred_at AT TIME ZONE 'UTC')::date AS day, account_id,
               coalesce(key_id, :no_key) AS key_id, requested_model,
               coalesce(provider, '') AS provider, coalesce(task_type, '') AS task_type,
               status_code, count(*) AS requests, sum(prompt_tokens) AS prompt_tokens,
               sum(completion_tokens) AS completion_tokens, sum(total_tokens) AS total_tokens,
               sum(cached_tokens) AS cached_tokens, sum(reasoning_tokens) AS reasoning_tokens,
               coalesce(sum(cost_usd), 0) AS cost_usd,
               count(*) FILTER (WHERE cost_usd IS NULL) AS unpriced_requests
        FROM usage_ledger
        WHERE recorded_at > :since AND recorded_at <= :until
        GROUP BY 1, 2, 3, 4, 5, 6, 7
    ), merged AS (
        INSERT INTO usage_daily AS d (day, account_id, key_id, requested_model, provider,
            task_type, status_code, requests, prompt_tokens, completion_tokens, total_tokens,
            cached_tokens, reasoning_tokens, cost_usd, unpriced_requests)
        SELECT * FROM batch
        ON CONFLICT (day, account_id, key_id, requested_model, provider, task_type, status_code)
        DO UPDATE SET requests = d.requests + excluded.requests,
                      prompt_tokens = d.prompt_tokens + excluded.prompt_tokens,
                      completion_tokens = d.completion_tokens + excluded.completion_tokens,
                      total_tokens = d.total_tokens + excluded.total_tokens,
                      cached_tokens = d.cached_tokens + excluded.cached_tokens,
                      reasoning_tokens = d.reasoning_tokens + excluded.reasoning_tokens,
                      cost_usd = d.cost_usd + excluded.cost_usd,
                      unpriced_requests = d.unpriced_requests + excluded.unpriced_requests
    )
    SELECT coalesce(sum(requests), 0) FROM batch
    """
)


def _midnight(at: datetime | None) -> bool:
    return at is None or (at.hour, at.minute, at.second, at.microsecond) == (0, 0, 0, 0)


@dataclass(frozen=True, slots=True)
class UsageFilter:
    account_id: uuid.UUID | None = None
    key_id: uuid.UUID | None = None
    task_id: str | None = None
    model: str | None = None
    start: datetime | None = None
    end: datetime | None = None

    def conditions(self) -> list[ColumnElement[bool]]:
        conditions: list[ColumnElement[bool]] = []
        if self.account_id is not None:
            conditions.append(L.account_id == self.account_id)
        if self.key_id is not None:
            conditions.append(L.key_id == self.key_id)
        if self.task_id is not None:
            conditions.append(L.task_id == self.task_id)
        if self.model is not None:
            conditions.append(L.requested_model == self.model)
        if self.start is not None:
            conditions.append(L.occurred_at >= self.start)
        if self.end is not None:
            conditions.append(L.occurred_at < self.end)
        return conditions

    def whole_days(self) -> bool:
        """Whether `usage_daily` can answer: no task id, a range of whole UTC days."""
        return self.task_id is None and _midnight(self.start) and _midnight(self.end)

    def daily_conditions(self) -> list[ColumnElement[bool]]:
        conditions: list[ColumnElement[bool]] = []
        if self.account_id is not None:
            conditions.append(D.account_id == self.account_id)
        if self.key_id is not None:
            conditions.append(D.key_id == self.key_id)
        if self.model is not None:
            conditions.append(D.requested_model == self.model)
        if self.start is not None:
            conditions.append(D.day >= self.start.date())
        if self.end is not None:
            conditions.append(D.day < self.end.date())
        return conditions


def _grouped(
    group_by: Sequence[GroupBy], columns: dict[str, Any], measures: Sequence[Any], summed: bool
) -> Select[Any]:
    """One side of a daily report, its group columns named as the report's fields: summed
    by the groups (each side aggregates on its own, in parallel where Postgres can, before
    the two are added up), or row by row for an outer GROUPING SETS."""
    groups = []
    for group in group_by:
        field, source = DAILY_GROUPS[group]
        expression = columns[source]
        if group == "month":
            expression = func.to_char(expression, literal("YYYY-MM"))
        groups.append(expression.label(field))
    statement = select(*groups, *measures)
    if groups and summed:
        positions = [literal(p, literal_execute=True) for p in range(1, len(groups) + 1)]
        statement = statement.group_by(*positions)
    return statement


def _rolled_up(where: UsageFilter, group_by: Sequence[GroupBy], summed: bool) -> Select[Any]:
    """The rollup's rows in range."""
    measures = [getattr(D, m) for m in (*MEASURES, "cost_usd", "unpriced_requests")]
    if summed:
        measures = [func.sum(m) for m in measures]
    return _grouped(
        group_by,
        {
            "day": D.day,
            "account_id": D.account_id,
            "key_id": func.nullif(D.key_id, NO_KEY),
            "requested_model": D.requested_model,
            "provider": func.nullif(D.provider, ""),
            "task_type": func.nullif(D.task_type, ""),
            "status_code": D.status_code,
        },
        [
            m.label(name)
            for m, name in zip(measures, (*MEASURES, "cost_usd", "unpriced_requests"), strict=True)
        ],
        summed,
    ).where(*where.daily_conditions())


def _recorded_since(
    where: UsageFilter, group_by: Sequence[GroupBy], summed: bool, since: Any
) -> Select[Any]:
    """The ledger rows in range recorded after `since` (a watermark)."""
    if summed:
        measures = [
            func.count(),
            *(func.sum(getattr(L, m)) for m in MEASURES[1:]),
            func.sum(L.cost_usd),
            func.count().filter(L.cost_usd.is_(None)),
        ]
    else:
        measures = [
            literal(1, BigInteger),
            *(cast(getattr(L, m), BigInteger) for m in MEASURES[1:]),
            L.cost_usd.expression,
            case((L.cost_usd.is_(None), 1), else_=0),
        ]
    return _grouped(
        group_by,
        {
            "day": cast(_utc(L.occurred_at), Date),
            "account_id": L.account_id,
            "key_id": L.key_id,
            "requested_model": L.requested_model,
            "provider": L.provider,
            "task_type": L.task_type,
            "status_code": L.status_code,
        },
        [
            m.label(name)
            for m, name in zip(measures, (*MEASURES, "cost_usd", "unpriced_requests"), strict=True)
        ],
        summed,
    ).where(*where.conditions(), L.recorded_at > since)


def _watermark() -> Select[Any]:
    return select(UsageDailyState.rolled_up_to).where(UsageDailyState.id == 1)


def _days_and_tail(where: UsageFilter, group_by: Sequence[GroupBy]) -> Any:
    """The rollup's rows in range and the ledger rows recorded since its watermark."""
    since = _watermark().scalar_subquery()
    days = _rolled_up(where, group_by, summed=True)
    return union_all(days, _recorded_since(where, group_by, True, since)).subquery("usage")


def _breakdown_sets(
    source: Any, every: Sequence[GroupBy], wanted: Sequence[Sequence[GroupBy]]
) -> Any:
    """`source`'s rows summed by each grouping of `wanted` (GROUPING SETS), beside the
    rollup's watermark read in the same statement: a row of NULL groups when none match."""
    u = source.subquery("usage").c
    fields = [DAILY_GROUPS[g][0] for g in every]
    sets = [tuple_(*(u[DAILY_GROUPS[g][0]] for g in s)) for s in wanted]
    summed = (
        select(
            *(u[f] for f in fields),
            func.grouping(*(u[f] for f in fields)).label("grouping_set"),
            *_daily_totals(u),
        )
        .group_by(func.grouping_sets(*sets))
        .subquery("sets")
    )
    state = _watermark().subquery("state")
    return select(state.c.rolled_up_to.label("watermark"), *summed.c).select_from(
        state.outerjoin(summed, true())
    )


@dataclass(frozen=True, slots=True)
class BreakdownPlan:
    """A breakdown statement, and where each grouping's fields and totals are in its rows."""

    statement: Select[Any]
    masks: dict[int, int]  # GROUPING(...) of a row → the grouping it belongs to
    picks: list[list[int]]  # per grouping, the columns of its fields
    first_total: int


def _sets_of(groupings: Sequence[Sequence[GroupBy]]) -> tuple[tuple[GroupBy, ...], ...]:
    return tuple(tuple(dict.fromkeys(g)) for g in groupings)


@lru_cache(maxsize=256)
def _breakdown_plan(
    where: UsageFilter, wanted: tuple[tuple[GroupBy, ...], ...], tail: bool
) -> BreakdownPlan:
    """Built once per filter and groupings: a dashboard reloaded reruns the same statement
    (the tail's with the watermark as the parameter `since`), not its construction."""
    every: list[GroupBy] = list(dict.fromkeys(g for s in wanted for g in s))
    if tail:
        source = _recorded_since(where, every, False, bindparam("since", type_=DateTime(True)))
    else:
        source = _rolled_up(where, every, summed=False)
    # GROUPING(...) has a bit set for each column left out of the row's grouping set.
    masks = {
        sum(1 << (len(every) - 1 - i) for i, g in enumerate(every) if g not in s): n
        for n, s in enumerate(wanted)
    }
    # Columns: the watermark, every group field, the grouping set, the totals.
    picks = [[1 + every.index(g) for g in s] for s in wanted]
    return BreakdownPlan(_breakdown_sets(source, every, wanted), masks, picks, 2 + len(every))


def _ledger_aggregate(where: UsageFilter, group_by: Sequence[GroupBy]) -> Select[Any]:
    columns = [GROUP_EXPRESSIONS[g][1].label(GROUP_EXPRESSIONS[g][0]) for g in group_by]
    return select(*columns, *TOTALS).where(*where.conditions())


def _daily_totals(u: Any) -> tuple[Any, ...]:
    return (
        *(cast(func.coalesce(func.sum(u[m]), 0), BigInteger).label(m) for m in MEASURES),
        # A group of unpriced rows only costs a zero of the stored scale, as once folded.
        func.coalesce(func.sum(u.cost_usd), cast(0, Numeric(30, 12))).label("cost_usd"),
        cast(func.coalesce(func.sum(u.unpriced_requests), 0), BigInteger).label(
            "unpriced_requests"
        ),
    )


def _daily_aggregate(where: UsageFilter, group_by: Sequence[GroupBy]) -> Select[Any]:
    u = _days_and_tail(where, group_by).c
    return select(*(u[DAILY_GROUPS[g][0]] for g in group_by), *_daily_totals(u))


class UsageRepository(Repository):
    async def key_account(self, key_id: uuid.UUID) -> uuid.UUID | None:
        return await self.session.scalar(select(ApiKey.account_id).where(ApiKey.id == key_id))

    async def aggregate(
        self, where: UsageFilter, group_by: Sequence[GroupBy], limit: int
    ) -> Sequence[Row[Any]]:
        """One row per group (one row in all without groups), ordered by the groups."""
        if where.whole_days() and all(g in DAILY_GROUPS for g in group_by):
            statement = _daily_aggregate(where, group_by)
        else:
            statement = _ledger_aggregate(where, group_by)
        if group_by:
            positions = [literal(p, literal_execute=True) for p in range(1, len(group_by) + 1)]
            statement = statement.group_by(*positions).order_by(*positions).limit(limit + 1)
        rows: Sequence[Row[Any]] = (await self.session.execute(statement)).all()
        return rows

    def breakdowns_from_rollup(
        self, where: UsageFilter, groupings: Sequence[Sequence[GroupBy]]
    ) -> bool:
        """Whether `rolled_up_breakdowns` and `breakdowns_since` answer these groupings."""
        return (
            where.whole_days()
            and all(groupings)
            and all(g in DAILY_GROUPS for s in groupings for g in s)
        )

    async def rolled_up_breakdowns(
        self, where: UsageFilter, groupings: Sequence[Sequence[GroupBy]]
    ) -> Breakdowns:
        """The rollup's totals of one range by each grouping, in one pass (GROUPING SETS),
        and the watermark they hold the ledger up to, read in the same snapshot."""
        return await self._breakdowns(_breakdown_plan(where, _sets_of(groupings), False), {})

    async def breakdowns_since(
        self, where: UsageFilter, groupings: Sequence[Sequence[GroupBy]], since: datetime
    ) -> Breakdowns:
        """The same totals over the ledger rows recorded after `since` (a watermark of
        `rolled_up_breakdowns`), and the rollup's watermark now. `since` is a parameter of
        its own, so Postgres plans the tail from the index on `recorded_at` for the instant
        given rather than guessing a third of the month."""
        plan = _breakdown_plan(where, _sets_of(groupings), True)
        return await self._breakdowns(plan, {"since": since})

    async def _breakdowns(self, plan: BreakdownPlan, parameters: dict[str, Any]) -> Breakdowns:
        out: list[dict[tuple[Any, ...], tuple[Any, ...]]] = [{} for _ in plan.picks]
        watermark: datetime | None = None
        first_total = plan.first_total
        for row in await self.session.execute(plan.statement, parameters):
            watermark = row[0]
            if row[first_total - 1] is not None:
                n = plan.masks[row[first_total - 1]]
                out[n][tuple(row[i] for i in plan.picks[n])] = row[first_total:]
        assert watermark is not None, "usage_daily_state holds its one row from migration 0006"
        return Breakdowns(watermark, out)

    async def roll_up_daily(self, wait: bool = True) -> tuple[datetime, datetime, int] | None:
        """Add the ledger rows recorded since the watermark to `usage_daily`, in this
        transaction; returns (from, to, ledger rows added), or None when another
        transaction is rolling up (with `wait=False`)."""
        statement = select(UsageDailyState.rolled_up_to).where(UsageDailyState.id == 1)
        since: datetime | None = await self.session.scalar(
            statement.with_for_update(skip_locked=not wait)
        )
        if since is None:
            return None
        until = await CutoffRepository(self.session).usage_cutoff()
        if until <= since:
            return since, since, 0
        parameters = {"since": since, "until": until, "no_key": NO_KEY}
        added = int((await self.session.execute(ROLL_UP_DAILY, parameters)).scalar_one())
        await self.session.execute(
            update(UsageDailyState).where(UsageDailyState.id == 1).values(rolled_up_to=until)
        )
        return since, until, added

    async def events(
        self, where: UsageFilter, limit: int, after: tuple[datetime, str] | None
    ) -> Sequence[UsageRecord]:
        """Ledger rows in (occurred_at, request_id) order, strictly after `after`."""
        statement = select(L).where(*where.conditions())
        if after is not None:
            at, request_id = after
            # The plain bound lets the index range scan start at the cursor; the row
            # comparison breaks ties between rows of the same instant.
            statement = statement.where(
                L.occurred_at >= at, tuple_(L.occurred_at, L.request_id) > tuple_(at, request_id)
            )
        statement = statement.order_by(L.occurred_at, L.request_id).limit(limit + 1)
        return (await self.session.scalars(statement)).all()


def _event_column(name: str) -> Any:
    # Ids as the text every export writes, counts as the integers they are stored as:
    # Postgres renders them, and no per-value conversion runs in Python.
    column = L.requested_model if name == "model" else getattr(L, name)
    if name in ("account_id", "key_id"):
        return cast(column, Text).label(name)
    if name.endswith("_tokens"):
        return type_coerce(column, BigInteger).label(name)
    return column.label(name)


# A raw row's columns, named and ordered as `UsageEvent`'s fields (`model` is the model
# asked for).
EVENT_COLUMNS = tuple(_event_column(name) for name in EVENT_FIELDS)


async def event_batches(
    connection: AsyncConnection, where: UsageFilter, batch: int
) -> AsyncIterator[Sequence[Row[Any]]]:
    """Every ledger row `where` selects, in (occurred_at, request_id) order as `events` pages
    them, `batch` rows at a time from a server-side cursor: any range in constant memory.

    Plain columns rather than ORM objects, handed over a batch at a time: per row, an
    entity and an async step would cost more than the rest of the export."""
    statement = (
        select(*EVENT_COLUMNS)
        .where(*where.conditions())
        .order_by(L.occurred_at, L.request_id)
        .execution_options(yield_per=batch)
    )
    result = await connection.stream(statement)
    async for rows in result.partitions(batch):
        yield rows


def _rfc3339(utc: Any) -> Any:
    """As the events API writes a time: UTC, `T`, `Z`, the six digits of the microseconds
    only when there are any, from `utc`, the text of the UTC timestamp (DateStyle ISO, set
    by `copy_events`): `YYYY-MM-DD HH:MI:SS` and a fraction without its trailing zeros.

    Its byte length says how many zeros the fraction lacks, so a simple CASE (the length
    taken once) picks the suffix: one replace and one concatenation per time, where a
    second cast and rpad made the two times a third of the export's work in Postgres. Any
    other length (not a time of years 1 to 9999) is padded to 26 characters by rpad."""

    def written(suffix: str) -> Any:
        return func.replace(utc, constant(" "), constant("T")) + constant(suffix)

    padded = func.rpad(utc, constant(26), constant("0"))
    return case(
        *((constant(26 - zeros), written("0" * zeros + "Z")) for zeros in range(7)),
        (constant(19), written("Z")),
        value=func.octet_length(utc),
        else_=func.replace(padded, constant(" "), constant("T")) + constant("Z"),
    )


# Text a client chose (ids, models, providers, error codes): prefixed in CSV where a
# spreadsheet would run it. The rest is numbers, times, ids and the ledger's own enums.
_CLIENT_TEXT = (
    "request_id",
    "task_id",
    "task_type",
    "model",
    "upstream_model",
    "provider",
    "error_code",
)


def _stored_column(name: str) -> Any:
    # The ledger's value, but for a time: its UTC text, cast once here so that rendering
    # refers to it (a CASE naming the cast twice would run it twice).
    column = L.requested_model if name == "model" else getattr(L, name)
    if name in ("occurred_at", "recorded_at"):
        column = cast(func.timezone(constant("UTC"), column), Text)
    return column.label(name)


def _rendered_column(stored: Any, name: str, csv: bool) -> Any:
    """A raw row's field as Postgres renders it into the export, as the events API writes
    it: times RFC 3339, the exact cost as decimal text, `true`/`false` (CSV; JSON has its
    own booleans), ids as text."""
    column = stored.c[name]
    if name in ("occurred_at", "recorded_at"):
        column = _rfc3339(column)
    elif name == "cost_usd":
        # NUMERIC's text is exact, all twelve places, as `format(Decimal, "f")` writes them.
        column = cast(column, Text)
    elif name == "stream" and csv:
        column = cast(column, Text)
    elif name.endswith("_tokens"):
        column = type_coerce(column, BigInteger)
    elif csv and name in _CLIENT_TEXT:
        column = text_cell_sql(column)
    return column.label(name)


# COPY's options per format. JSON Lines: one column already holding the line's JSON, in
# CSV format so that nothing is escaped (text format would double every backslash), with a
# quote and a delimiter JSON never holds unescaped (control characters) so no line is quoted.
_COPY_OPTIONS: dict[str, dict[str, Any]] = {
    "csv": {"format": "csv", "header": True},
    "jsonl": {"format": "csv", "quote": "\x01", "delimiter": "\x02"},
}


def _copy_query(where: UsageFilter, fmt: str) -> Select[Any]:
    csv = fmt == "csv"
    # Read in order from the index on (occurred_at, request_id), rendered once read (the
    # ordered subquery is a level of its own, in its order; were the index not chosen,
    # the sort would move the ledger's narrower values, as Postgres computes a select list
    # before its ORDER BY).
    stored = (
        select(*(_stored_column(name) for name in EVENT_FIELDS))
        .where(*where.conditions())
        .order_by(L.occurred_at, L.request_id)
        .subquery("e")
    )
    rows = select(*(_rendered_column(stored, name, csv) for name in EVENT_FIELDS))
    if csv:
        return rows
    return select(_json_line(rows.subquery("j")))


# A JSON line's values that are written as their text: numbers and booleans bare, and text
# JSON never escapes (RFC 3339 times, ids, decimal digits) between quotes. Any other field
# goes through `to_json`, which escapes it.
_JSON_BARE = frozenset(
    (
        "stream",
        "status_code",
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "cached_tokens",
        "reasoning_tokens",
        "latency_ms",
        "ttft_ms",
        "price_version_id",
    )
)
_JSON_QUOTED = frozenset(("occurred_at", "recorded_at", "account_id", "key_id", "cost_usd"))


def _json_line(rows: Any) -> Any:
    """A raw row as the JSON object `row_to_json` would write (the same bytes: fields in
    order, no spaces, null for NULL), concatenated field by field: `row_to_json` looks each
    column's type up again for every row, a sixth of the JSON Lines export's database time.
    """
    line: Any = None
    for n, name in enumerate(EVENT_FIELDS):
        column = rows.c[name]
        if name in _JSON_BARE:
            value = cast(column, Text)
        elif name in _JSON_QUOTED:
            value = constant('"') + cast(column, Text) + constant('"')
        else:
            value = cast(func.to_json(column), Text)
        field = constant(f'{"," if n else "{"}"{name}":') + func.coalesce(value, constant("null"))
        line = field if line is None else line + field
    return (line + constant("}")).label("line")


async def copy_events(
    connection: AsyncConnection,
    where: UsageFilter,
    fmt: str,
    sink: Callable[[bytes], Awaitable[None]],
) -> None:
    """Every ledger row `where` selects, in (occurred_at, request_id) order, rendered by
    Postgres as `fmt` (csv: a header, then rows ending in LF; jsonl: a JSON object per
    line) and handed to `sink` a network read at a time (whole rows each time: Postgres
    sends a message per row), through COPY: no row is decoded in Python.

    asyncpg stops reading from the socket until `sink` returns, so a slow consumer holds
    Postgres back instead of piling rows up in memory."""
    # The time format depends on DateStyle; JIT's compile time (seconds for these
    # expressions) exceeds what it saves on one pass.
    await connection.execute(text("SET LOCAL DateStyle = 'ISO'"))
    await connection.execute(text("SET LOCAL jit = off"))
    compiled = _copy_query(where, fmt).compile(
        dialect=connection.dialect, compile_kwargs={"render_postcompile": True}
    )
    # The filter's values (UUIDs, text, times) go to asyncpg as they are; it inlines them
    # through Postgres's own quoting, as COPY takes no parameters.
    parameters = [compiled.params[name] for name in compiled.positiontup or ()]
    raw = await connection.get_raw_connection()
    driver: Any = raw.driver_connection
    await driver.copy_from_query(str(compiled), *parameters, output=sink, **_COPY_OPTIONS[fmt])
