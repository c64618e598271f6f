"""`usage_rollup`: the priced ledger rows outside quoted tasks, summed per month, account,
ledger kind, model, price version and task id up to a watermark, and read back."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import any_, bindparam, exists, func, or_, select, text, update

from service.db.models import Task, UsageRollup, UsageRollupState
from service.db.repository import Repository
from service.invoices.repository.cutoff import CutoffRepository
from service.invoices.repository.sums import BULK_ACCOUNTS, UUIDS, UsageSum, totals_of

# Rows recorded in (since, until] with a price version and a cost, summed into the rollup.
# Postgres cannot prune partitions by `recorded_at`, but each partition's index on it finds
# just the rows of the window.
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


class RollupRepository(Repository):
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
                totals_of(r),
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
        until = await CutoffRepository(self.session).usage_cutoff()
        if until <= since:
            return since, since, 0
        added = int(
            (await self.session.execute(ROLL_UP, {"since": since, "until": until})).scalar_one()
        )
        await self.session.execute(
            update(UsageRollupState).where(UsageRollupState.id == 1).values(rolled_up_to=until)
        )
        return since, until, added
