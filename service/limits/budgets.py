"""Monthly spend counters with reservations, in integer nano-USD (Redis: `.counters`).

Each budget (an account's or a key's, for one month) has three parts:

- `spent`: the cost of settled requests, never below the ledger's sum for the month
  (`sync` raises it to that sum; it never lowers it, since the ledger may lag);
- `reserved`: what requests in flight may still cost, each under its reservation id;
- the limit, passed with each call (so a changed budget applies at once).

A reservation fits when `spent + reserved + amount <= limit` and something is left; every
budget of a request is checked and charged together, atomically, or none is.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Hold:
    counter: str  # e.g. "account:<id>:2026-07"
    limit: int
    amount: int


@dataclass(frozen=True, slots=True)
class HoldResult:
    refused: int | None = None  # index of the first budget that could not cover it
    spent: int = 0  # of the refusing budget
    reserved: int = 0

    @property
    def allowed(self) -> bool:
        return self.refused is None


@dataclass
class _Budget:
    spent: int = 0
    holds: dict[str, tuple[int, float]] = field(default_factory=dict)  # id → (amount, deadline)
    reserved: int = 0

    def expire(self, now: float) -> None:
        for rid, (amount, deadline) in list(self.holds.items()):
            if deadline <= now:
                del self.holds[rid]
                self.reserved -= amount


def _fits(limit: int, spent: int, reserved: int, amount: int) -> bool:
    left = limit - spent - reserved
    return left > 0 and amount <= left


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
        for index, (hold, budget) in enumerate(zip(holds, budgets, strict=True)):
            budget.expire(now)
            if not _fits(hold.limit, budget.spent, budget.reserved, hold.amount):
                return HoldResult(index, budget.spent, budget.reserved)
        for hold, budget in zip(holds, budgets, strict=True):
            budget.holds[reservation] = (hold.amount, now + ttl_s)
            budget.reserved += hold.amount
        return HoldResult()

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

    async def state(self, counter: str) -> tuple[int, int]:
        budget = self._get(counter)
        budget.expire(time.monotonic())
        return budget.spent, budget.reserved

    async def close(self) -> None:
        return None
