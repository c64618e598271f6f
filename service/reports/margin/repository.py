"""The margin report's one query: quoted tasks completed in a month, their cost from the ledger."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

# Cost is the exact ledger cost of the rows the task covers (those from its acceptance on,
# of any month); revenue is what the task is billed, as fixed at its completion
# (`tasks.billed_as`, see `pricing.invoice.task_billing`): its fixed price, that cost, or
# nothing. A later change of the account's policy changes neither its bill nor this report.
MARGIN_BY_TYPE_AND_MODEL = """
WITH done AS (
    SELECT t.task_type, t.model, t.status, t.billed_as, t.fixed_price_usd,
           q.quantile_cost_usd, q.confidence, c.cost, c.provider_cost, c.unknown_cost_requests
    FROM tasks t
    JOIN quotes q ON q.id = t.quote_id
    CROSS JOIN LATERAL (
        SELECT coalesce(sum(l.cost_usd), 0) AS cost,
               coalesce(sum(l.provider_cost_usd), 0) AS provider_cost,
               count(*) FILTER (WHERE l.provider_cost_usd IS NULL) AS unknown_cost_requests
        FROM usage_ledger l
        WHERE l.account_id = t.account_id AND l.task_id = t.external_id
          AND l.occurred_at >= t.created_at
    ) c
    WHERE t.status <> 'open' AND t.completed_at >= :start AND t.completed_at < :end
      AND (CAST(:account_id AS uuid) IS NULL OR t.account_id = :account_id)
)
SELECT task_type, model,
       count(*) AS tasks,
       count(*) FILTER (WHERE status = 'succeeded') AS succeeded,
       count(*) FILTER (WHERE status = 'failed') AS failed,
       count(*) FILTER (WHERE status = 'expired') AS expired,
       coalesce(sum(fixed_price_usd) FILTER (WHERE billed_as = 'fixed_price'), 0)
           AS fixed_revenue,
       coalesce(sum(cost) FILTER (WHERE billed_as = 'cost'), 0) AS cost_revenue,
       coalesce(sum(cost), 0) AS cost,
       coalesce(sum(provider_cost), 0) AS provider_cost,
       coalesce(sum(unknown_cost_requests), 0) AS unknown_cost_requests,
       count(*) FILTER (WHERE cost <= fixed_price_usd) AS within_price,
       count(*) FILTER (WHERE cost <= quantile_cost_usd) AS within_quantile,
       sum(confidence) AS confidence_sum
FROM done
GROUP BY GROUPING SETS ((task_type, model), ())
ORDER BY GROUPING(task_type, model), task_type, model
"""


async def margin_rows(
    session: AsyncSession, start: datetime, end: datetime, account_id: uuid.UUID | None
) -> Sequence[Any]:
    result = await session.execute(
        text(MARGIN_BY_TYPE_AND_MODEL), {"start": start, "end": end, "account_id": account_id}
    )
    return result.all()


# Token usage billed per token (not covered by a quoted task) that occurred in the month, per
# account, model and task type: revenue is each row's `cost_usd` (exactly what invoices
# bill for it), provider cost each row's `provider_cost_usd`; a row whose provider cost is
# unknown (NULL) adds to neither margin figure but to the unknown share.
USAGE_MARGIN = """
SELECT l.account_id, l.requested_model AS model, l.task_type,
       count(*) AS requests,
       count(*) FILTER (WHERE l.cost_usd IS NULL) AS unpriced_requests,
       coalesce(sum(l.cost_usd), 0) AS revenue,
       coalesce(sum(l.cost_usd) FILTER (WHERE l.provider_cost_usd IS NOT NULL), 0)
           AS revenue_known_cost,
       coalesce(sum(l.provider_cost_usd), 0) AS provider_cost,
       count(*) FILTER (WHERE l.provider_cost_usd IS NULL) AS unknown_cost_requests,
       coalesce(sum(l.total_tokens), 0) AS tokens,
       coalesce(sum(l.total_tokens) FILTER (WHERE l.provider_cost_usd IS NULL), 0)
           AS unknown_cost_tokens
FROM usage_ledger l
WHERE l.occurred_at >= :start AND l.occurred_at < :end AND l.kind = 'usage'
  AND (CAST(:account_id AS uuid) IS NULL OR l.account_id = :account_id)
  AND NOT (l.task_id IS NOT NULL AND EXISTS (
      SELECT 1 FROM tasks t
      WHERE t.account_id = l.account_id AND t.external_id = l.task_id
        AND t.quote_id IS NOT NULL AND l.occurred_at >= t.created_at))
GROUP BY GROUPING SETS ((l.account_id, l.requested_model, l.task_type), ())
ORDER BY GROUPING(l.account_id, l.requested_model, l.task_type), l.account_id,
         l.requested_model, l.task_type NULLS FIRST
"""


async def usage_margin_rows(
    session: AsyncSession, start: datetime, end: datetime, account_id: uuid.UUID | None
) -> Sequence[Any]:
    result = await session.execute(
        text(USAGE_MARGIN), {"start": start, "end": end, "account_id": account_id}
    )
    return result.all()
