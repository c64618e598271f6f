"""The proxy's task admission check: closed tasks and capped quoted tasks are refused in memory.

Checking a request never touches the database. Each process holds a view of

- every **closed** (completed) task, as 64-bit hashes of (account, task id) in a sorted
  array (8 bytes a task) plus a small set of recent additions;
- every **open quoted** task: its model, the instant it was accepted, its cost cap, the
  ledger's sum of its cost at the last refresh (and whether any of its usage has no price),
  and the cost of requests this process settled that the ledger did not hold yet.

A quoted task covers the requests that occurred at or after its acceptance, on its quoted
model only: another model is refused (409 `task_model_mismatch`), and only covered requests
count toward its cap. A request that occurs at or after the task's deadline (`expires_at`)
is refused as on a completed task (409 `task_completed`), whether or not the expiry has run
yet: the task is billed by its account's expired-task policy then, which covers no more
work. A request on the task id before the acceptance is ordinary usage,
billed per token, and neither checked nor counted here. Usage without a price cannot be
measured against a cap in dollars, so a quoted task with any such request counts as having
reached its cap (with the quote bound to a priced model this happens only when a process
priced a request with a book that did not yet hold the model's price). Estimated usage
counts at its estimated cost, as it is billed.

How the view follows the database:

- completing or accepting in this process updates the view at once (before commit: a task
  refused a moment early is harmless; a rolled-back completion is undone by the next load);
- other processes learn it from `NOTIFY meterline_tasks`, sent inside the completing
  transaction and so delivered at its commit (milliseconds);
- every `task_guard_refresh_s` the open quoted tasks and their ledger cost are reloaded and
  the tasks closed since the last load are added (this also covers a lost notification or
  a dropped listening connection, which is reopened with a full reload);
- the settlement hook adds each finished request's exact cost to its quoted task at once.

So: a task completed through this process is refused on its very next request; through
another process, within the notification's delivery (or one refresh if it is lost). A
quoted task's running cost counts this process's requests immediately and other
processes' within one refresh plus the ledger's flush interval. Requests already admitted
when a task closes or passes its cap still finish (nothing is reserved per task), so a cap
can be overshot by the requests in flight at that moment, never by later ones.
"""

from __future__ import annotations

import array
import bisect
import contextlib
import hashlib
import json
import logging
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg

from service.db.channels import Channel
from service.db.listener import Listener
from service.errors import MeterlineError
from service.ledger.record import LedgerRecord
from service.lifecycle import Periodic
from service.proxy.context import RequestContext
from service.tasks import repository
from service.webhooks.events import EventType
from service.webhooks.pending import PendingEvent, PendingEvents

log = logging.getLogger("meterline.tasks")

# Tasks closed shortly before a load may commit after it: reload a little behind the mark.
_CLOSED_OVERLAP = timedelta(seconds=60)
# The recent set is merged into the sorted array when it grows past this.
_FOLD_AT = 50_000


class TaskClosed(MeterlineError):
    status_code = 409
    code = "task_completed"


class TaskCostCapReached(MeterlineError):
    status_code = 402
    code = "task_cost_cap_reached"


class TaskModelMismatch(MeterlineError):
    status_code = 409
    code = "task_model_mismatch"


# The OpenAI SDK retries 409s by default; these refusals are final, so say so.
_NO_RETRY = {"x-should-retry": "false"}


def _instant(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


def task_key(account_id: uuid.UUID, task_id: str) -> int:
    digest = hashlib.blake2b(account_id.bytes + task_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


@dataclass(slots=True)
class QuotedTaskCost:
    model: str
    accepted_at: datetime
    cap: Decimal
    expires_at: datetime | None = None
    ledger_cost: Decimal = Decimal(0)
    ledger_unpriced: bool = False
    # request_id → cost (None: no price) of requests settled here that the last reload did
    # not see.
    pending: dict[str, Decimal | None] = field(default_factory=dict)

    def covers(self, at: datetime) -> bool:
        return at >= self.accepted_at

    def expired_at(self, at: datetime) -> bool:
        return self.expires_at is not None and at >= self.expires_at

    @property
    def cost(self) -> Decimal:
        settled = (c for c in self.pending.values() if c is not None)
        return self.ledger_cost + sum(settled, Decimal(0))

    @property
    def unpriced(self) -> bool:
        return self.ledger_unpriced or None in self.pending.values()


class TaskGuard:
    """The in-memory view (see the module docstring); `admit` and `settle` are proxy hooks."""

    def __init__(
        self,
        dsn: str | None,
        refresh_s: float = 2.0,
        settle_window_s: float = 600.0,
        *,
        listener: Listener | None = None,
        events: PendingEvents | None = None,
    ) -> None:
        self._dsn = dsn
        # Where a task reaching its cap is told (`task.cost_cap_reached`), once a process.
        self._events = events
        self._cap_noticed: set[int] = set()
        self._settle_window_s = settle_window_s
        self._closed = array.array("q")
        self._closed_recent: set[int] = set()
        self._open: dict[int, QuotedTaskCost] = {}
        self._closed_mark: datetime | None = None
        self._connection: asyncpg.Connection | None = None  # the reloads' own
        self._full_reload_due = False
        # The database may be down; the last good view stays.
        self._follower = Periodic("task_guard_refresh", refresh_s, self._follow, log)
        if listener is not None:
            listener.subscribe(Channel.TASKS, self._on_notify, self._listening)

    # ---- the hot path -------------------------------------------------------------------

    def is_closed(self, key: int) -> bool:
        if key in self._closed_recent:
            return True
        index = bisect.bisect_left(self._closed, key)
        return index < len(self._closed) and self._closed[index] == key

    def check(self, account_id: uuid.UUID, task_id: str | None, model: str, at: datetime) -> None:
        """Raise if a request on this task must not be forwarded; no I/O.

        `model` is the model asked for and `at` the instant the request occurred."""
        if not task_id:
            return
        key = task_key(account_id, task_id)
        if self.is_closed(key):
            raise TaskClosed(
                f"task {task_id!r} is already completed; start a new task id for more work",
                param="x-task-id",
                headers=_NO_RETRY,
            )
        quoted = self._open.get(key)
        if quoted is None or not quoted.covers(at):
            return
        if quoted.expired_at(at):
            assert quoted.expires_at is not None
            raise TaskClosed(
                f"task {task_id!r} expired at its deadline {quoted.expires_at.isoformat()}"
                " and is billed as expired; start a new task id for more work",
                param="x-task-id",
                headers=_NO_RETRY,
            )
        if model != quoted.model:
            raise TaskModelMismatch(
                f"task {task_id!r} was quoted for model {quoted.model!r}; a request on it"
                f" cannot use {model!r}",
                param="model",
                headers=_NO_RETRY,
            )
        if quoted.unpriced:
            raise TaskCostCapReached(
                f"task {task_id!r} has usage without a price, so its cost cannot be held to"
                f" its cap of {quoted.cap} USD; it accepts no more requests",
                param="x-task-id",
                headers=_NO_RETRY,
            )
        if quoted.cost >= quoted.cap:
            raise TaskCostCapReached(
                f"task {task_id!r} reached its cost cap of {quoted.cap} USD"
                " (a multiple of its fixed price); it accepts no more requests",
                param="x-task-id",
                headers=_NO_RETRY,
            )

    def quoted_model(self, account_id: uuid.UUID, task_id: str, at: datetime) -> str | None:
        """The model a request on this task at `at` must use (None: no quoted task covers it)."""
        quoted = self._open.get(task_key(account_id, task_id))
        return quoted.model if quoted is not None and quoted.covers(at) else None

    def open_cost(self, account_id: uuid.UUID, task_id: str) -> Decimal | None:
        """The running cost of an open quoted task as this process sees it (None: not one)."""
        quoted = self._open.get(task_key(account_id, task_id))
        return None if quoted is None else quoted.cost

    async def admit(self, ctx: RequestContext) -> None:
        self.check(ctx.account_id, ctx.task_id, ctx.model, ctx.occurred_at)

    async def settle(
        self, ctx: RequestContext, record: LedgerRecord | None, _held: None = None
    ) -> None:
        if record is None or not record.task_id:
            return
        quoted = self._open.get(task_key(record.account_id, record.task_id))
        if quoted is not None and quoted.covers(record.occurred_at):
            quoted.pending[record.request_id] = record.cost_usd
            self._notice_cap(record.account_id, record.task_id, quoted)

    def _notice_cap(self, account_id: uuid.UUID, task_id: str, quoted: QuotedTaskCost) -> None:
        """Offer `task.cost_cap_reached` the first time this process sees the task past its
        cap (no I/O: the event reaches the outbox off the hot path, once whoever offers it)."""
        if self._events is None or not (quoted.unpriced or quoted.cost >= quoted.cap):
            return
        key = task_key(account_id, task_id)
        if key in self._cap_noticed:
            return
        self._cap_noticed.add(key)
        self._events.offer(
            PendingEvent(
                EventType.TASK_COST_CAP_REACHED,
                {
                    "account_id": str(account_id),
                    "task_id": task_id,
                    "model": quoted.model,
                    "cost_cap_usd": str(quoted.cap),
                    "cost_usd": str(quoted.cost),
                    "unpriced_usage": quoted.unpriced,
                },
                account_id,
                f"task.cost_cap_reached:{account_id}:{task_id}",
                datetime.now(UTC),
            )
        )

    # ---- changes made by this process ---------------------------------------------------

    def mark_closed(self, account_id: uuid.UUID, task_id: str) -> None:
        key = task_key(account_id, task_id)
        self._closed_recent.add(key)
        self._open.pop(key, None)
        self._cap_noticed.discard(key)

    def mark_open_quoted(
        self,
        account_id: uuid.UUID,
        task_id: str,
        model: str,
        accepted_at: datetime,
        cap: Decimal,
        expires_at: datetime | None = None,
    ) -> None:
        key = task_key(account_id, task_id)
        self._open.setdefault(key, QuotedTaskCost(model, accepted_at, cap, expires_at))

    # ---- following the database ---------------------------------------------------------

    async def start(self) -> None:
        if self._dsn is None:
            return
        try:
            await self._connect_and_load()
        except (OSError, asyncpg.PostgresError) as exc:
            log.warning("event=task_guard_load_failed error=%s", type(exc).__name__)
        self._follower.start()

    async def stop(self) -> None:
        await self._follower.stop()
        await self._close_connection()

    async def _close_connection(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()
            self._connection = None

    async def _connect_and_load(self) -> None:
        await self._close_connection()
        self._connection = await asyncpg.connect(self._dsn)
        self._full_reload_due = False
        await self.reload(full=True)

    def _listening(self) -> None:
        # The listening connection (re)opened: what was notified while it was down was
        # missed, so the next round reloads everything. Before the first load, nothing to do.
        if self._connection is not None:
            self._full_reload_due = True
            self._follower.wake()

    def _on_notify(self, payload: str) -> None:
        try:
            message = json.loads(payload)
            account_id = uuid.UUID(message["account_id"])
            if message["event"] == "closed":
                self.mark_closed(account_id, message["task_id"])
            elif message["event"] == "opened":
                self.mark_open_quoted(
                    account_id,
                    message["task_id"],
                    message["model"],
                    datetime.fromisoformat(message["accepted_at"]),
                    Decimal(message["cap"]),
                    _instant(message.get("expires_at")),
                )
        except (ValueError, KeyError, TypeError):
            log.warning("event=task_notify_unreadable")

    async def reload(self, *, full: bool = False) -> None:
        """Reload the open quoted tasks' costs and the tasks closed since the last load."""
        connection = self._connection
        if connection is None:
            return
        started = datetime.now(UTC)
        pending_ids = [rid for q in self._open.values() for rid in q.pending]
        # One snapshot: a row flushed between the two reads would otherwise count twice or
        # not at all; in one snapshot it is in the ledger sum or still pending, never both.
        async with connection.transaction(isolation="repeatable_read", readonly=True):
            open_rows = await repository.open_quoted_tasks(connection)
            confirmed = await repository.confirmed_requests(connection, pending_ids)
            since = None if full or self._closed_mark is None else self._closed_mark
            closed_rows = await repository.closed_tasks_since(connection, since)
        opened: dict[int, QuotedTaskCost] = {}
        for row in open_rows:
            key = task_key(row["account_id"], row["external_id"])
            previous = self._open.get(key)
            pending: dict[str, Decimal | None] = {}
            if previous is not None:
                pending = {r: c for r, c in previous.pending.items() if r not in confirmed}
            opened[key] = QuotedTaskCost(
                row["model"],
                row["accepted_at"],
                row["cost_cap_usd"],
                row["expires_at"],
                row["cost_usd"],
                row["unpriced"],
                pending,
            )
        closed = {task_key(r["account_id"], r["external_id"]) for r in closed_rows}
        if full:
            self._closed = array.array("q", sorted(closed))
            self._closed_recent = set()
        else:
            self._closed_recent |= closed
            if len(self._closed_recent) > _FOLD_AT:
                self._closed = array.array("q", sorted({*self._closed, *self._closed_recent}))
                self._closed_recent = set()
        # Tasks this process closed after the snapshot was taken stay closed.
        self._open = {k: v for k, v in opened.items() if not self.is_closed(k)}
        # Past its cap through other processes' requests (or before a restart): told too.
        for row in open_rows:
            quoted = self._open.get(task_key(row["account_id"], row["external_id"]))
            if quoted is not None:
                self._notice_cap(row["account_id"], row["external_id"], quoted)
        self._closed_mark = started - _CLOSED_OVERLAP

    async def _follow(self) -> None:
        try:
            if self._connection is None or self._connection.is_closed():
                await self._connect_and_load()
            elif self._full_reload_due:
                self._full_reload_due = False
                await self.reload(full=True)
            else:
                await self.reload()
                await repository.settle_recent(self._connection, self._settle_window_s)
        except Exception:
            await self._close_connection()  # the next round starts over with a full load
            raise
