"""The monthly report's one query, streamed from a server-side cursor."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import RowMapping, text
from sqlalchemy.ext.asyncio import AsyncConnection

# Aggregation happens in Postgres, over the month's partition only (the occurred_at bounds
# prune the others). Usage of quoted tasks is broken out by the task's type; the invoice
# shown is the account's live one for the period, else its latest voided one.
MONTHLY_SQL = """
WITH usage AS (
    SELECT l.account_id,
           l.requested_model AS model,
           t.task_type,
           count(*) AS requests,
           sum(l.prompt_tokens)::bigint AS prompt_tokens,
           sum(l.completion_tokens)::bigint AS completion_tokens,
           sum(l.total_tokens)::bigint AS total_tokens,
           sum(l.cached_tokens)::bigint AS cached_tokens,
           sum(l.reasoning_tokens)::bigint AS reasoning_tokens,
           coalesce(sum(l.cost_usd), 0) AS cost_usd,
           count(*) FILTER (WHERE l.cost_usd IS NULL) AS unpriced_requests
    FROM usage_ledger l
    LEFT JOIN tasks t
           ON t.account_id = l.account_id
          AND t.external_id = l.task_id
          AND t.quote_id IS NOT NULL
    WHERE l.occurred_at >= :start AND l.occurred_at < :end {account_filter}
    GROUP BY 1, 2, 3
), invoice AS (
    SELECT DISTINCT ON (account_id) account_id, number, status, total_usd
    FROM invoices
    WHERE period = :period {invoice_filter}
    ORDER BY account_id, status = 'void', created_at DESC
)
SELECT u.account_id,
       a.name AS account_name,
       u.model,
       u.task_type,
       u.requests,
       u.prompt_tokens,
       u.completion_tokens,
       u.total_tokens,
       u.cached_tokens,
       u.reasoning_tokens,
       u.cost_usd,
       u.unpriced_requests,
       i.number AS invoice_number,
       i.status AS invoice_status,
       i.total_usd AS invoice_total_usd
FROM usage u
LEFT JOIN accounts a ON a.id = u.account_id
LEFT JOIN invoice i ON i.account_id = u.account_id
ORDER BY a.name COLLATE "C", u.account_id, u.model COLLATE "C", u.task_type COLLATE "C" NULLS FIRST
"""


def monthly_statement(account_id: uuid.UUID | None) -> str:
    if account_id is None:
        return MONTHLY_SQL.format(account_filter="", invoice_filter="")
    return MONTHLY_SQL.format(
        account_filter="AND l.account_id = :account_id",
        invoice_filter="AND account_id = :account_id",
    )


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
    params: dict[str, Any] = {"start": start, "end": end, "period": period}
    if account_id is not None:
        params["account_id"] = account_id
    result = await connection.stream(
        text(monthly_statement(account_id)).execution_options(yield_per=batch), params
    )
    async for rows in result.mappings().partitions(batch):
        yield rows
