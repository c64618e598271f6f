"""The reports' queries. The monthly report's: the month's rows streamed from a server-side
cursor, and the few rows stored without a price, summed per span of their model's price
timeline. The unpriced-usage report's: those rows per account and model."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import RowMapping, and_, case, func, select, text
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql import ColumnElement, FromClause

from pricing.invoice import UsageTotals
from pricing.prices import PriceSegment
from service.db.repository import Repository, constant, readable
from service.invoices.repository.sums import L, in_segment, measures, segment_table, totals_of
from service.reports.schemas import FORMULA_START, SKIPPED_BEFORE_FORMULA


def text_cell_sql(value: Any) -> ColumnElement[Any]:
    """`service.reports.service.text_cell` in SQL, for a CSV export Postgres renders itself:
    the text prefixed with `'` when a spreadsheet would run it as a formula; NULL stays NULL
    (an empty cell). Every character that starts a formula or is skipped before one is
    below `A`, so a cell starting with a letter (nearly all) costs one integer comparison."""
    below = max(map(ord, FORMULA_START + tuple(SKIPPED_BEFORE_FORMULA)))
    first = func.left(func.ltrim(value, constant(SKIPPED_BEFORE_FORMULA)), constant(1))
    formula = and_(
        func.ascii(value) <= constant(below),
        first.in_([constant(c) for c in FORMULA_START]),
    )
    return case((formula, constant("'") + value), else_=value)


# A ledger row's line: usage a quoted task covers (from its acceptance on) is `task_usage`,
# billed through the task; the rest is billed per token, as `tokens` or `adjustment`.
_KIND = """CASE WHEN t.id IS NOT NULL THEN 'task_usage'
                WHEN l.kind = 'adjustment' THEN 'adjustment' ELSE 'tokens' END"""
_COVERING_TASK = """LEFT JOIN tasks t
           ON t.account_id = l.account_id
          AND t.external_id = l.task_id
          AND t.quote_id IS NOT NULL
          AND l.occurred_at >= t.created_at"""

# Aggregation happens in Postgres, over the month's partition only (the occurred_at bounds
# prune the others). Quoted tasks completed in the month are lines of their own, grouped
# by how each was billed at completion (the service applies `pricing.invoice.task_charge`
# to the `charge_*` columns); an account with an invoice for the month and nothing else
# gets a line of zeros. The invoice shown is the account's live one for the period, else
# its latest voided one.
MONTHLY_SQL = f"""
WITH usage AS (
    SELECT l.account_id,
           {_KIND} AS kind,
           l.requested_model AS model,
           t.task_type,
           0::bigint AS tasks,
           count(*) AS requests,
           sum(l.prompt_tokens)::bigint AS prompt_tokens,
           sum(l.completion_tokens)::bigint AS completion_tokens,
           sum(l.total_tokens)::bigint AS total_tokens,
           sum(least(greatest(l.cached_tokens, 0), l.prompt_tokens))::bigint AS cached_tokens,
           sum(l.reasoning_tokens)::bigint AS reasoning_tokens,
           coalesce(sum(l.cost_usd), 0) AS cost_usd,
           count(*) FILTER (WHERE l.cost_usd IS NULL) AS unpriced_requests,
           NULL::text AS billed_as,
           NULL::numeric AS fixed_price_usd,
           NULL::numeric AS charge_cost_usd
    FROM usage_ledger l
    {_COVERING_TASK}
    WHERE l.occurred_at >= :start AND l.occurred_at < :end {{ledger_filter}}
    GROUP BY 1, 2, 3, 4
), done AS (
    SELECT t.account_id, 'task' AS kind, coalesce(t.model, '') AS model, t.task_type,
           count(*) AS tasks, 0, 0, 0, 0, 0, 0, 0, 0,
           t.billed_as, t.fixed_price_usd, coalesce(sum(c.cost_usd), 0)
    FROM tasks t
    LEFT JOIN LATERAL (
        SELECT sum(l.cost_usd) AS cost_usd FROM usage_ledger l
        WHERE l.account_id = t.account_id AND l.task_id = t.external_id
          AND l.occurred_at >= t.created_at
    ) c ON t.billed_as = 'cost'
    WHERE t.quote_id IS NOT NULL AND t.status <> 'open'
      AND t.completed_at >= :start AND t.completed_at < :end {{task_filter}}
    GROUP BY t.account_id, t.model, t.task_type, t.billed_as, t.fixed_price_usd
), invoice AS (
    SELECT DISTINCT ON (account_id) account_id, number, status, total_usd,
           (SELECT coalesce(sum(c.amount_usd), 0.00) FROM credit_notes c
            WHERE c.invoice_id = invoices.id) AS credited_usd
    FROM invoices
    WHERE period = :period {{invoice_filter}}
    ORDER BY account_id, status = 'void', created_at DESC
), lines AS (
    SELECT * FROM usage
    UNION ALL SELECT * FROM done
    UNION ALL
    SELECT i.account_id, 'tokens', '', NULL, 0, 0, 0, 0, 0, 0, 0, 0, 0, NULL, NULL, NULL
    FROM invoice i
    WHERE NOT EXISTS (SELECT 1 FROM usage_ledger l WHERE l.account_id = i.account_id
                      AND l.occurred_at >= :start AND l.occurred_at < :end)
      AND NOT EXISTS (SELECT 1 FROM done d WHERE d.account_id = i.account_id)
)
SELECT u.account_id,
       a.name AS account_name,
       u.kind,
       u.model,
       u.task_type,
       u.tasks,
       u.requests,
       u.prompt_tokens,
       u.completion_tokens,
       u.total_tokens,
       u.cached_tokens,
       u.reasoning_tokens,
       u.cost_usd,
       u.unpriced_requests,
       u.billed_as AS charge_billed_as,
       u.fixed_price_usd AS charge_fixed_price_usd,
       u.charge_cost_usd,
       i.number AS invoice_number,
       i.status AS invoice_status,
       i.total_usd AS invoice_total_usd,
       i.credited_usd AS invoice_credited_usd,
       CASE WHEN i.status = 'void' THEN 0.00 ELSE i.total_usd - i.credited_usd END
           AS invoice_amount_due_usd
FROM lines u
LEFT JOIN accounts a ON a.id = u.account_id
LEFT JOIN invoice i ON i.account_id = u.account_id
ORDER BY a.name COLLATE "C", u.account_id, u.model COLLATE "C",
         u.task_type COLLATE "C" NULLS FIRST, u.kind COLLATE "C" DESC,
         u.billed_as COLLATE "C", u.fixed_price_usd
"""

# The month's rows stored without a price, per line and span of the model's price timeline
# (`seg`: model, segment, span_start, span_end), so the service prices each span by the
# version in force then, as invoices do. Few rows: the partial index finds them.
UNPRICED_SQL = f"""
SELECT l.account_id, {_KIND} AS kind, l.requested_model AS model, t.task_type,
       seg.segment, count(*) AS requests, sum(l.prompt_tokens)::bigint AS prompt_tokens,
       sum(l.completion_tokens)::bigint AS completion_tokens,
       sum(least(greatest(l.cached_tokens, 0), l.prompt_tokens))::bigint AS cached_tokens
FROM usage_ledger l
{_COVERING_TASK}
JOIN unnest(CAST(:seg_model AS text[]), CAST(:seg_index AS bigint[]),
            CAST(:seg_start AS timestamptz[]), CAST(:seg_end AS timestamptz[]))
     AS seg(model, segment, span_start, span_end)
  ON seg.model = l.requested_model
 AND (seg.span_start IS NULL OR l.occurred_at >= seg.span_start)
 AND (seg.span_end IS NULL OR l.occurred_at < seg.span_end)
WHERE l.occurred_at >= :start AND l.occurred_at < :end AND l.cost_usd IS NULL
  AND (l.price_version_id IS NULL OR l.cost_usd IS NULL) {{ledger_filter}}
GROUP BY 1, 2, 3, 4, 5
"""

# The rows without a price of the tasks billed at cost that completed in the month (of any
# month: a task's line bills all its rows), per task line and span.
UNPRICED_TASK_SQL = """
SELECT t.account_id, coalesce(t.model, '') AS task_model, t.task_type,
       l.requested_model AS model, seg.segment, count(*) AS requests,
       sum(l.prompt_tokens)::bigint AS prompt_tokens,
       sum(l.completion_tokens)::bigint AS completion_tokens,
       sum(least(greatest(l.cached_tokens, 0), l.prompt_tokens))::bigint AS cached_tokens
FROM tasks t
JOIN usage_ledger l
  ON l.account_id = t.account_id AND l.task_id = t.external_id
 AND l.occurred_at >= t.created_at AND l.cost_usd IS NULL
JOIN unnest(CAST(:seg_model AS text[]), CAST(:seg_index AS bigint[]),
            CAST(:seg_start AS timestamptz[]), CAST(:seg_end AS timestamptz[]))
     AS seg(model, segment, span_start, span_end)
  ON seg.model = l.requested_model
 AND (seg.span_start IS NULL OR l.occurred_at >= seg.span_start)
 AND (seg.span_end IS NULL OR l.occurred_at < seg.span_end)
WHERE t.quote_id IS NOT NULL AND t.billed_as = 'cost'
  AND t.completed_at >= :start AND t.completed_at < :end {task_filter}
GROUP BY 1, 2, 3, 4, 5
"""

# Which models have rows without a price that the report prices: the month's own, and
# those of tasks billed at cost completed in the month.
UNPRICED_MODELS_SQL = """
SELECT DISTINCT l.requested_model FROM usage_ledger l
WHERE l.occurred_at >= :start AND l.occurred_at < :end AND l.cost_usd IS NULL
  AND (l.price_version_id IS NULL OR l.cost_usd IS NULL) {ledger_filter}
UNION
SELECT DISTINCT l.requested_model FROM tasks t
JOIN usage_ledger l ON l.account_id = t.account_id AND l.task_id = t.external_id
 AND l.occurred_at >= t.created_at AND l.cost_usd IS NULL
WHERE t.quote_id IS NOT NULL AND t.billed_as = 'cost'
  AND t.completed_at >= :start AND t.completed_at < :end {task_filter}
"""


def _statement(sql: str, account_id: uuid.UUID | None) -> str:
    if account_id is None:
        return sql.format(ledger_filter="", task_filter="", invoice_filter="")
    return sql.format(
        ledger_filter="AND l.account_id = :account_id",
        task_filter="AND t.account_id = :account_id",
        invoice_filter="AND account_id = :account_id",
    )


def monthly_statement(account_id: uuid.UUID | None) -> str:
    return _statement(MONTHLY_SQL, account_id)


def _params(
    period: str, start: datetime, end: datetime, account_id: uuid.UUID | None
) -> dict[str, Any]:
    params: dict[str, Any] = {"start": start, "end": end, "period": period}
    if account_id is not None:
        params["account_id"] = account_id
    return params


async def monthly_rows(
    connection: AsyncConnection,
    period: str,
    start: datetime,
    end: datetime,
    account_id: uuid.UUID | None,
    batch: int = 1000,
) -> AsyncIterator[Sequence[RowMapping]]:
    """The report's rows in order, `batch` at a time from a server-side cursor.

    Fetched and handed over a batch at a time, not row by row: each step of an async
    result costs a context switch, which per row would dominate a large export.
    """
    result = await connection.stream(
        text(monthly_statement(account_id)).execution_options(yield_per=batch),
        _params(period, start, end, account_id),
    )
    async for rows in result.mappings().partitions(batch):
        yield rows


async def unpriced_models(
    connection: AsyncConnection, start: datetime, end: datetime, account_id: uuid.UUID | None
) -> list[str]:
    rows = await connection.execute(
        text(_statement(UNPRICED_MODELS_SQL, account_id)), _params("", start, end, account_id)
    )
    return sorted(r[0] for r in rows)


async def unpriced_sums(
    connection: AsyncConnection,
    start: datetime,
    end: datetime,
    account_id: uuid.UUID | None,
    segments: dict[str, Any],
) -> tuple[Sequence[RowMapping], Sequence[RowMapping]]:
    """The month's unpriced rows per line and span; and those of its tasks billed at cost.

    `segments` maps a model to its price timeline (`pricing.prices.PriceSegment` list)."""
    flat = [(m, i, s) for m, spans in segments.items() for i, s in enumerate(spans)]
    params = {
        **_params("", start, end, account_id),
        "seg_model": [m for m, _, _ in flat],
        "seg_index": [i for _, i, _ in flat],
        "seg_start": [s.start for _, _, s in flat],
        "seg_end": [s.end for _, _, s in flat],
    }
    usage = await connection.execute(text(_statement(UNPRICED_SQL, account_id)), params)
    tasks = await connection.execute(text(_statement(UNPRICED_TASK_SQL, account_id)), params)
    return usage.mappings().all(), tasks.mappings().all()


@dataclass(frozen=True, slots=True)
class UnpricedRow:
    account_id: uuid.UUID
    model: str
    totals: UsageTotals
    first_occurred_at: datetime
    last_occurred_at: datetime
    segment: int | None = None


class UnpricedUsageRepository(Repository):
    async def unpriced_rows(
        self,
        start: datetime,
        end: datetime,
        account_id: uuid.UUID | None,
        segments: dict[str, list[PriceSegment]] | None = None,
    ) -> list[UnpricedRow]:
        """Rows of [start, end) stored without a price, per account and model (and span)."""
        where = [L.occurred_at >= start, L.occurred_at < end, L.cost_usd.is_(None)]
        source: FromClause = L.__table__
        keys: tuple[Any, ...] = (L.account_id, L.requested_model)
        if segments is not None:
            seg = segment_table(segments)
            source = source.join(seg, in_segment(L, seg))
            keys = (*keys, seg.c.segment)
        statement = (
            select(
                *keys,
                *measures(L),
                func.min(L.occurred_at).label("first"),
                func.max(L.occurred_at).label("last"),
            )
            .select_from(source)
            .where(*where)
            .group_by(*keys)
            .order_by(*keys)
        )
        rows = await self.session.execute(readable(statement, L.account_id, account_id))
        return [
            UnpricedRow(
                r.account_id,
                r.requested_model,
                totals_of(r),
                r.first,
                r.last,
                int(r.segment) if segments is not None else None,
            )
            for r in rows
        ]
