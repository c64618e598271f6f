"""Fixed one-minute windows of requests and tokens, in this process (Redis: `.counters`).

A hit checks every counter of a request (account and key, requests and tokens) and counts
it in all of them or in none: a request refused by one limit uses up nothing. Window `w`
covers `[w * 60, (w + 1) * 60)` seconds of Unix time, the same on every worker and
replica, so in Redis the counts from all of them add up in one key per window.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from service.limits.policy import WINDOW_S


@dataclass(frozen=True, slots=True)
class Charge:
    counter: str  # e.g. "account:<id>:requests"
    limit: int
    cost: int


@dataclass(frozen=True, slots=True)
class WindowResult:
    window: int
    reset_s: float  # seconds until the window ends
    # After the hit when allowed; as found when refused.
    counts: tuple[int, ...]
    refused: int | None = None  # index of the first charge that did not fit

    @property
    def allowed(self) -> bool:
        return self.refused is None


def window_of(now: float) -> tuple[int, float]:
    window = int(now // WINDOW_S)
    return window, (window + 1) * WINDOW_S - now


class MemoryRateLimiter:
    """Counters of this process only: exact for one worker, per worker for several."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, int], int] = {}
        self._oldest = 0

    def _forget_before(self, window: int) -> None:
        if window - 1 > self._oldest:
            self._oldest = window - 1
            self._counts = {k: v for k, v in self._counts.items() if k[1] >= self._oldest}

    async def hit(self, charges: Sequence[Charge], now: float) -> WindowResult:
        # No await between reading and writing: the event loop makes this atomic.
        window, reset_s = window_of(now)
        self._forget_before(window)
        current = [self._counts.get((c.counter, window), 0) for c in charges]
        for index, (charge, count) in enumerate(zip(charges, current, strict=True)):
            if count + charge.cost > charge.limit:
                return WindowResult(window, reset_s, tuple(current), refused=index)
        for charge in charges:
            self._counts[(charge.counter, window)] = (
                self._counts.get((charge.counter, window), 0) + charge.cost
            )
        counts = tuple(self._counts[(c.counter, window)] for c in charges)
        return WindowResult(window, reset_s, counts)

    async def adjust(self, counter: str, window: int, delta: int) -> None:
        key = (counter, window)
        if key in self._counts:
            self._counts[key] += delta

    async def close(self) -> None:
        return None
