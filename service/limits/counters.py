"""Rate windows and budgets, checked and charged together: one step of the event loop in the
process, one Lua script (one round trip) in Redis (`service/limits/redis_counters.py`).

`admit` counts a request in every window of its limits and reserves its worst-case cost in
every budget, or does nothing at all and says which limit refused it. `settle` corrects
the token windows to what the request really used and replaces its reservations by its
real cost. Everything is an integer: requests, tokens, nano-USD.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from service.limits.budgets import Hold, HoldResult, MemoryBudgetStore
from service.limits.ratelimit import Charge, MemoryRateLimiter, WindowResult


@dataclass(frozen=True, slots=True)
class Admission:
    window: WindowResult
    budget: HoldResult

    @property
    def allowed(self) -> bool:
        return self.window.allowed and self.budget.allowed


class Counters(Protocol):
    # What the store raises when it fails (not when it refuses): the caller lets the request
    # through on rate limits and refuses on budgets (service/limits/service.py).
    failures: tuple[type[Exception], ...]

    async def admit(
        self,
        charges: Sequence[Charge],
        holds: Sequence[Hold],
        reservation: str,
        ttl_s: float,
        now: float,
    ) -> Admission: ...

    async def settle(
        self,
        window: int,
        corrections: Sequence[tuple[str, int]],
        budgets: Sequence[str],
        reservation: str,
        cost: int,
    ) -> None:
        """Add each (counter, delta) to `window`; release `reservation`, add `cost`."""
        ...

    async def sync(self, budget: str, ledger_spent: int) -> None:
        """Raise a budget's spend to the ledger's sum (never lower it: the ledger may lag)."""
        ...

    async def state(self, budget: str) -> tuple[int, int]:
        """(spent, reserved) of a budget now."""
        ...

    async def flush(self) -> None:
        """Apply settlements still waiting (a store may batch them)."""
        ...

    async def close(self) -> None:
        """Apply what is waiting and stop (graceful shutdown)."""
        ...


class MemoryCounters:
    """This process's counters: exact for one worker, per worker for several."""

    # Nothing here can fail; a connection error of the database read on the same path
    # (a prepaid account's credit) is handled as a store failure, as it always was.
    failures: tuple[type[Exception], ...] = (OSError,)

    def __init__(self) -> None:
        self.windows = MemoryRateLimiter()
        self.budgets = MemoryBudgetStore()

    async def admit(
        self,
        charges: Sequence[Charge],
        holds: Sequence[Hold],
        reservation: str,
        ttl_s: float,
        now: float,
    ) -> Admission:
        # Neither store ever suspends: no other request runs between checks and charges.
        window = await self.windows.hit(charges, now)
        if not window.allowed or not holds:
            return Admission(window, HoldResult())
        held = await self.budgets.reserve(holds, reservation, ttl_s)
        if not held.allowed:
            for charge in charges:  # a refused request uses up nothing
                await self.windows.adjust(charge.counter, window.window, -charge.cost)
        return Admission(window, held)

    async def settle(
        self,
        window: int,
        corrections: Sequence[tuple[str, int]],
        budgets: Sequence[str],
        reservation: str,
        cost: int,
    ) -> None:
        for counter, delta in corrections:
            await self.windows.adjust(counter, window, delta)
        if budgets:
            await self.budgets.settle(budgets, reservation, cost)

    async def sync(self, budget: str, ledger_spent: int) -> None:
        await self.budgets.sync(budget, ledger_spent)

    async def state(self, budget: str) -> tuple[int, int]:
        return await self.budgets.state(budget)

    async def flush(self) -> None:
        return None

    async def close(self) -> None:
        return None
