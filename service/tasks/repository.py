"""Every query of tasks: the task rows, their usage aggregated from the ledger, the guard's view.

A task's usage is never stored on the task while it runs (that would be a hot-row UPDATE
per request): it is summed from the append-only ledger through the partial index
`ix_usage_ledger_account_task`. Only at completion is the exact cost copied onto the task
(`completed_cost_usd`), for the history that quotes learn from.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import asyncpg
from sqlalchemy import func, select, text, tuple_
from sqlalchemy.dialects.postgresql import insert

from pricing.invoice import TaskBilling, TaskOutcome, TaskStatus
from service.db.channels import Channel, notify
from service.db.models import Account, Task
from service.db.repository import Repository, readable

# The ledger rows of one task (`l`), summed. Adjustment rows count in cost, not in requests.
_USAGE = """
    count(*) FILTER (WHERE l.kind = 'usage') AS requests,
    coalesce(sum(l.prompt_tokens), 0)::bigint AS prompt_tokens,
    coalesce(sum(l.completion_tokens), 0)::bigint AS completion_tokens,
    coalesce(sum(l.total_tokens), 0)::bigint AS total_tokens,
    coalesce(sum(l.cost_usd), 0) AS cost_usd,
    count(*) FILTER (WHERE l.cost_usd IS NULL) AS unpriced_requests,
    min(l.occurred_at) AS first_at,
    max(l.task_type) AS ledger_task_type,
    mode() WITHIN GROUP (ORDER BY l.requested_model) AS ledger_model
"""

# The cost a completed task goes into the history with: NULL when any row is unpriced, so
# a partly unpriced task never teaches quotes that work is cheaper than it is.
_HISTORY_COST = """
    CASE WHEN bool_or(l.cost_usd IS NULL) THEN NULL ELSE coalesce(sum(l.cost_usd), 0) END
"""
# Whether ledger row `l` belongs to its task `t`: a quoted task covers the rows that occurred
# from its acceptance on (its row's `created_at`: the row is inserted when the quote is
# accepted); earlier rows on its id are ordinary usage, billed per token.
COVERED = "(t.quote_id IS NULL OR l.occurred_at >= t.created_at)"

# An expired task is closed at its deadline, so it is billed in the month the deadline
# passed whenever the expiry runs; its cost joins the history like any completed task's.
_EXPIRE = f"""
UPDATE tasks t SET status = 'expired', completed_at = t.expires_at, billed_as = x.billed_as,
    completed_cost_usd = (SELECT {_HISTORY_COST} FROM usage_ledger l
        WHERE l.account_id = t.account_id AND l.task_id = t.external_id AND {COVERED})
FROM unnest(CAST(:ids AS uuid[]), CAST(:billings AS text[])) AS x(id, billed_as)
WHERE t.id = x.id AND t.status = 'open'
"""

# The rows of task id `:t` of account `:a` that are its task's (no task row: all of them).
_ROWS_OF_TASK = f"""
    usage_ledger l LEFT JOIN tasks t
        ON t.account_id = l.account_id AND t.external_id = l.task_id
    WHERE l.account_id = :a AND l.task_id = :t AND {COVERED}
"""


@dataclass(frozen=True, slots=True)
class TaskUsage:
    requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost_usd: Decimal
    unpriced_requests: int
    first_at: datetime | None
    ledger_task_type: str | None
    ledger_model: str | None

    @property
    def seen(self) -> bool:
        return self.first_at is not None

    @classmethod
    def from_row(cls, row: Any) -> TaskUsage:
        return cls(
            requests=row.requests or 0,
            prompt_tokens=row.prompt_tokens or 0,
            completion_tokens=row.completion_tokens or 0,
            total_tokens=row.total_tokens or 0,
            cost_usd=row.cost_usd if row.cost_usd is not None else Decimal(0),
            unpriced_requests=row.unpriced_requests or 0,
            first_at=row.first_at,
            ledger_task_type=row.ledger_task_type,
            ledger_model=row.ledger_model,
        )


EMPTY_USAGE = TaskUsage(0, 0, 0, 0, Decimal(0), 0, None, None, None)


@dataclass(frozen=True, slots=True)
class TaskFilter:
    account_id: uuid.UUID | None
    status: str | None = None
    task_type: str | None = None
    model: str | None = None
    quoted: bool | None = None
    completed_from: datetime | None = None
    completed_to: datetime | None = None


class TaskRepository(Repository):
    async def get(
        self, account_id: uuid.UUID, external_id: str, *, for_update: bool = False
    ) -> Task | None:
        statement = select(Task).where(
            Task.account_id == account_id, Task.external_id == external_id
        )
        if for_update:
            statement = statement.with_for_update()
        task: Task | None = await self.session.scalar(statement)
        return task

    async def usage(self, account_id: uuid.UUID, external_id: str) -> TaskUsage:
        """The task's own rows (a quoted task's from its acceptance on: `COVERED`)."""
        row = (
            await self.session.execute(
                text(f"SELECT {_USAGE} FROM {_ROWS_OF_TASK}"),
                {"a": account_id, "t": external_id},
            )
        ).one()
        return TaskUsage.from_row(row)

    async def history_cost(self, account_id: uuid.UUID, external_id: str) -> Decimal | None:
        value: Decimal | None = await self.session.scalar(
            text(f"SELECT {_HISTORY_COST} FROM {_ROWS_OF_TASK}"),
            {"a": account_id, "t": external_id},
        )
        return value

    async def policies(self, account_id: uuid.UUID) -> tuple[str, str]:
        """The account's failed-task and expired-task policies, as in force now."""
        row = (
            await self.session.execute(
                select(Account.failed_task_policy, Account.expired_task_policy).where(
                    Account.id == account_id
                )
            )
        ).one()
        return row.failed_task_policy, row.expired_task_policy

    async def due_for_expiry(
        self, now: datetime, account_ids: Sequence[uuid.UUID] | None, skip_locked: bool
    ) -> list[Any]:
        """Open quoted tasks past their deadline, locked, with their account's policies."""
        scope = "" if account_ids is None else "AND t.account_id = ANY(:accounts)"
        rows = await self.session.execute(
            text(
                "SELECT t.id, t.account_id, t.external_id, a.failed_task_policy,"
                " a.expired_task_policy FROM tasks t JOIN accounts a ON a.id = t.account_id"
                f" WHERE t.status = 'open' AND t.expires_at <= :now {scope}"
                " ORDER BY t.id FOR UPDATE OF t" + (" SKIP LOCKED" if skip_locked else "")
            ),
            {"now": now, **({} if account_ids is None else {"accounts": list(account_ids)})},
        )
        return list(rows)

    async def expire(self, billings: dict[uuid.UUID, str]) -> None:
        """Close these open tasks as expired at their deadline, billed as given."""
        await self.session.execute(
            text(_EXPIRE),
            {"ids": list(billings), "billings": list(billings.values())},
        )

    async def reread(self, task_ids: Sequence[uuid.UUID]) -> Sequence[Task]:
        """These tasks as stored now (a statement changed them behind the session's back)."""
        statement = (
            select(Task)
            .where(Task.id.in_(list(task_ids)))
            .execution_options(populate_existing=True)
        )
        return (await self.session.scalars(statement)).all()

    async def has_usage(self, account_id: uuid.UUID, external_id: str) -> bool:
        found = await self.session.scalar(
            text("SELECT 1 FROM usage_ledger WHERE account_id = :a AND task_id = :t LIMIT 1"),
            {"a": account_id, "t": external_id},
        )
        return found is not None

    async def insert(self, values: dict[str, Any]) -> Task | None:
        """Insert a task; None when the account already has a task of that id."""
        statement = (
            insert(Task)
            .values(**values)
            .on_conflict_do_nothing(index_elements=["account_id", "external_id"])
            .returning(Task)
        )
        task: Task | None = await self.session.scalar(
            statement, execution_options={"populate_existing": True}
        )
        return task

    async def complete(
        self,
        task: Task,
        outcome: TaskOutcome,
        cost: Decimal | None,
        task_type: str | None,
        model: str | None,
        billed_as: TaskBilling | None,
        at: datetime | None = None,
    ) -> Task:
        task.status = TaskStatus(outcome.value)
        task.completed_at = at or func.now()
        task.billed_as = billed_as
        task.completed_cost_usd = cost
        task.task_type = task.task_type or task_type
        task.model = task.model or model
        await self.session.flush()
        await self.session.refresh(task)
        return task

    async def adopt_from_ledger(self, account_id: uuid.UUID | None) -> None:
        """Give every task seen only in the ledger a row (open, not quoted), so lists page it."""
        scope = "AND l.account_id = :a" if account_id else ""
        await self.session.execute(
            text(
                "INSERT INTO tasks (account_id, external_id, task_type, model, created_at)"
                " SELECT l.account_id, l.task_id, max(l.task_type),"
                " mode() WITHIN GROUP (ORDER BY l.requested_model), min(l.occurred_at)"
                " FROM usage_ledger l"
                f" WHERE l.task_id IS NOT NULL {scope}"
                " AND EXISTS (SELECT 1 FROM accounts a WHERE a.id = l.account_id)"
                " AND NOT EXISTS (SELECT 1 FROM tasks t"
                "   WHERE t.account_id = l.account_id AND t.external_id = l.task_id)"
                " GROUP BY l.account_id, l.task_id"
                " ON CONFLICT (account_id, external_id) DO NOTHING"
            ),
            {"a": account_id} if account_id else {},
        )

    async def page(
        self, where: TaskFilter, limit: int, after: tuple[datetime, uuid.UUID] | None
    ) -> list[tuple[Task, TaskUsage]]:
        """Newest first, keyset-paginated on (created_at, id); usage summed for the page only."""
        statement = readable(select(Task.id), Task.account_id, where.account_id)
        if where.status is not None:
            statement = statement.where(Task.status == where.status)
        if where.task_type is not None:
            statement = statement.where(Task.task_type == where.task_type)
        if where.model is not None:
            statement = statement.where(Task.model == where.model)
        if where.quoted is not None:
            quoted = Task.quote_id.is_not(None) if where.quoted else Task.quote_id.is_(None)
            statement = statement.where(quoted)
        if where.completed_from is not None:
            statement = statement.where(Task.completed_at >= where.completed_from)
        if where.completed_to is not None:
            statement = statement.where(Task.completed_at < where.completed_to)
        if after is not None:
            statement = statement.where(tuple_(Task.created_at, Task.id) < tuple_(*after))
        statement = statement.order_by(Task.created_at.desc(), Task.id.desc()).limit(limit)
        ids = (await self.session.scalars(statement)).all()
        if not ids:
            return []
        tasks = {
            task.id: task
            for task in await self.session.scalars(select(Task).where(Task.id.in_(ids)))
        }
        rows = await self.session.execute(
            text(
                f"SELECT t.id, u.* FROM tasks t CROSS JOIN LATERAL (SELECT {_USAGE}"
                " FROM usage_ledger l WHERE l.account_id = t.account_id"
                f" AND l.task_id = t.external_id AND {COVERED}) u WHERE t.id = ANY(:ids)"
            ),
            {"ids": list(ids)},
        )
        usage = {row.id: TaskUsage.from_row(row) for row in rows}
        return [(tasks[i], usage.get(i, EMPTY_USAGE)) for i in ids]

    async def notify(self, payload: str) -> None:
        """Tell every Meterline process (at commit) that a task opened or closed."""
        await notify(self.session, Channel.TASKS, payload)


# ---- The proxy-side guard's queries (a dedicated asyncpg connection, off the hot path) ----

OPEN_QUOTED_TASKS = f"""
SELECT t.account_id, t.external_id, t.model, t.created_at AS accepted_at, t.cost_cap_usd,
       t.expires_at, u.cost_usd, u.unpriced
FROM tasks t CROSS JOIN LATERAL (
    SELECT coalesce(sum(l.cost_usd), 0) AS cost_usd,
           coalesce(bool_or(l.kind = 'usage' AND l.cost_usd IS NULL), false) AS unpriced
    FROM usage_ledger l
    WHERE l.account_id = t.account_id AND l.task_id = t.external_id AND {COVERED}
) u
WHERE t.status = 'open' AND t.quote_id IS NOT NULL
"""

CLOSED_TASKS_SINCE = """
SELECT account_id, external_id FROM tasks
WHERE completed_at IS NOT NULL AND ($1::timestamptz IS NULL OR completed_at >= $1)
"""

CONFIRMED_REQUESTS = "SELECT request_id FROM usage_ledger WHERE request_id = ANY($1::text[])"

# Completed tasks whose cost changed since completion (rows still in flight then) get their
# history cost settled.
SETTLE_RECENT = f"""
WITH recent AS (
    SELECT t.id,
           (SELECT {_HISTORY_COST} FROM usage_ledger l
            WHERE l.account_id = t.account_id AND l.task_id = t.external_id
              AND {COVERED}) AS cost
    FROM tasks t
    WHERE t.completed_at >= now() - make_interval(secs => $1)
)
UPDATE tasks t SET completed_cost_usd = recent.cost
FROM recent
WHERE t.id = recent.id AND t.completed_cost_usd IS DISTINCT FROM recent.cost
"""


async def open_quoted_tasks(connection: asyncpg.Connection) -> Sequence[asyncpg.Record]:
    return list(await connection.fetch(OPEN_QUOTED_TASKS))


async def closed_tasks_since(
    connection: asyncpg.Connection, since: datetime | None
) -> Sequence[asyncpg.Record]:
    return list(await connection.fetch(CLOSED_TASKS_SINCE, since))


async def confirmed_requests(connection: asyncpg.Connection, request_ids: list[str]) -> set[str]:
    if not request_ids:
        return set()
    return {r["request_id"] for r in await connection.fetch(CONFIRMED_REQUESTS, request_ids)}


async def settle_recent(connection: asyncpg.Connection, window_s: float) -> None:
    async with connection.transaction():
        # One process at a time: the others skip this round instead of queueing behind it.
        if await connection.fetchval(
            "SELECT pg_try_advisory_xact_lock(hashtext('meterline_task_settle'))"
        ):
            await connection.execute(SETTLE_RECENT, window_s)
