"""Monthly spend counters with reservations, in integer nano-USD (Redis: `.counters`).

Each budget (an account's or a key's, for one month) has four parts:

- `spent`: the cost of settled requests, never below the ledger's sum for the month
  (`sync` raises it to that sum; it never lowers it, since the ledger may lag);
- `reserved`: what requests in flight may still cost, each under its reservation id;
- `synced`: whether `spent` was ever started from the ledger. A budget that was not (a
  new process, a new month, a Redis that restarted empty) refuses to reserve and says
  so, so the caller syncs it first: a counter at 0 must never admit as if nothing had
  been spent;
- the limit, passed with each call (so a changed budget applies at once).

A reservation fits when something is left and its `minimum` fits in what is left; it then
holds `amount`, or all that is left when less (a request without a completion limit gets
what remains and is capped to it). Every budget of a request is checked and charged
together, atomically, with the same amount, or none is.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Hold:
    """One budget a request reserves against; every hold of a request has the same amounts."""

    counter: str  # e.g. "account:<id>:2026-07"
    limit: int
    amount: int
    minimum: int | None = None  # the least it may be granted; None: the whole amount

    @property
    def least(self) -> int:
        return self.amount if self.minimum is None else min(self.minimum, self.amount)


@dataclass(frozen=True, slots=True)
class HoldResult:
    refused: int | None = None  # index of the first budget that could not cover it
    spent: int = 0  # of the refusing budget
    reserved: int = 0
    granted: int = 0  # what is now held in every budget (when allowed)
    unsynced: bool = False  # refused because that budget was never synced from the ledger

    @property
    def allowed(self) -> bool:
        return self.refused is None


@dataclass
class _Budget:
    spent: int = 0
    holds: dict[str, tuple[int, float]] = field(default_factory=dict)  # id → (amount, deadline)
    reserved: int = 0
    synced: bool = False

    def expire(self, now: float) -> None:
        for rid, (amount, deadline) in list(self.holds.items()):
            if deadline <= now:
                del self.holds[rid]
                self.reserved -= amount


class MemoryBudgetStore:
    def __init__(self) -> None:
        self._budgets: dict[str, _Budget] = {}

    def _get(self, counter: str) -> _Budget:
        budget = self._budgets.get(counter)
        if budget is None:
            budget = self._budgets[counter] = _Budget()
        return budget

    async def reserve(self, holds: Sequence[Hold], reservation: str, ttl_s: float) -> HoldResult:
        # No await inside: checked and charged in one step of the event loop.
        now = time.monotonic()
        budgets = [self._get(h.counter) for h in holds]
        granted: int | None = None
        for index, (hold, budget) in enumerate(zip(holds, budgets, strict=True)):
            if not budget.synced:
                return HoldResult(index, unsynced=True)
            budget.expire(now)
            left = hold.limit - budget.spent - budget.reserved
            if left <= 0 or hold.least > left:
                return HoldResult(index, budget.spent, budget.reserved)
            fits = min(hold.amount, left)
            granted = fits if granted is None else min(granted, fits)
        for budget in budgets:
            budget.holds[reservation] = (granted or 0, now + ttl_s)
            budget.reserved += granted or 0
        return HoldResult(granted=granted or 0)

    async def settle(self, counters: Sequence[str], reservation: str, cost: int) -> None:
        for counter in counters:
            budget = self._get(counter)
            held = budget.holds.pop(reservation, None)
            if held is not None:
                budget.reserved -= held[0]
            budget.spent += cost

    async def sync(self, counter: str, ledger_spent: int) -> None:
        budget = self._get(counter)
        budget.spent = max(budget.spent, ledger_spent)
        budget.synced = True

    async def state(self, counter: str) -> tuple[int, int]:
        budget = self._get(counter)
        budget.expire(time.monotonic())
        return budget.spent, budget.reserved

    async def close(self) -> None:
        return None
