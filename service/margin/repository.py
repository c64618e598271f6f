"""The margin report's one query: quoted tasks completed in a month, their cost from the ledger."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

# Cost is the task's whole ledger cost (rows of any month), as billed tokens would have been.
MARGIN_BY_TYPE_AND_MODEL = """
WITH done AS (
    SELECT t.task_type, t.model, t.status, t.fixed_price_usd,
           q.quantile_cost_usd, q.confidence, a.failed_task_policy,
           (SELECT coalesce(sum(l.cost_usd), 0) FROM usage_ledger l
            WHERE l.account_id = t.account_id AND l.task_id = t.external_id) AS cost
    FROM tasks t
    JOIN quotes q ON q.id = t.quote_id
    JOIN accounts a ON a.id = t.account_id
    WHERE t.status <> 'open' AND t.completed_at >= :start AND t.completed_at < :end
      AND (CAST(:account_id AS uuid) IS NULL OR t.account_id = :account_id)
)
SELECT task_type, model,
       count(*) AS tasks,
       count(*) FILTER (WHERE status = 'succeeded') AS succeeded,
       count(*) FILTER (WHERE status = 'failed') AS failed,
       coalesce(sum(fixed_price_usd) FILTER (WHERE status = 'succeeded'), 0) AS fixed_revenue,
       coalesce(sum(cost) FILTER (WHERE status = 'failed' AND failed_task_policy = 'cost'), 0)
           AS failed_revenue,
       coalesce(sum(cost), 0) AS cost,
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
