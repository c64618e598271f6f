"""Live statistics per (provider, model): error rate, time to first byte, total latency.

Each attempt the proxy makes is observed here (`observe`: a few float operations, no I/O).
The figures are exponentially weighted moving averages: the first observations make a
plain mean, then each new one weighs `ALPHA`, so a provider's last hundred or so attempts
dominate. An error rate also fades towards zero while a route gets no traffic (half-life
`ERROR_HALF_LIFE_S`): a provider that was passed over for its errors is tried again
later, instead of being judged forever by what it did once.

`generation` counts the changes that may reorder routes at once: a route's first figures,
a failure, the end of a failure streak, a cooldown, figures from the other workers, a seed.
Routing keeps a ranking across whatever else happens for a few milliseconds
(service/routing/service.py: `RANKING_TTL_S`): a latency's or an error rate's drift.

A provider failing `cooldown_failures` attempts in a row is cooled down: passed over for
`cooldown_s`, then tried again (a probe); a success ends its cooldown, a failure starts
another. Cooldowns are each worker's own (it sees a dead provider within a few attempts).

With Redis (service/routing/sharing.py) every worker publishes `local` and replaces `view`,
what routing reads, by the merge of all workers' published figures; without it, `view` is
`local` itself. The ledger seeds `local` at start-up (service/routing/repository.py).
"""

from __future__ import annotations

import math
import os
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

ALPHA = 0.1
ERROR_HALF_LIFE_S = 60.0
RouteKey = tuple[str, str]  # (provider, model)


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(slots=True)
class RouteFigures:
    samples: float
    error_rate: float
    ttft_ms: float | None
    latency_ms: float | None
    updated: float  # time.time() of the last observation

    def error_at(self, now: float) -> float:
        """The error rate, faded by the time since the route was last observed."""
        idle = now - self.updated
        if idle <= 0:
            return self.error_rate
        return self.error_rate * math.pow(0.5, idle / ERROR_HALF_LIFE_S)


def _ewma(current: float | None, value: float, weight: float) -> float:
    return value if current is None else current + weight * (value - current)


def merge(parts: Iterable[RouteFigures]) -> RouteFigures:
    """One route's figures from several workers': means weighted by their samples."""
    parts = list(parts)
    samples = sum(p.samples for p in parts) or 1.0
    error = sum(p.samples * p.error_rate for p in parts) / samples

    def mean(values: list[tuple[float, float]]) -> float | None:
        weight = sum(w for w, _ in values)
        return sum(w * v for w, v in values) / weight if weight else None

    ttft = mean([(p.samples, p.ttft_ms) for p in parts if p.ttft_ms is not None])
    latency = mean([(p.samples, p.latency_ms) for p in parts if p.latency_ms is not None])
    return RouteFigures(
        sum(p.samples for p in parts), error, ttft, latency, max(p.updated for p in parts)
    )


class RoutingStats:
    def __init__(self, cooldown_failures: int = 3, cooldown_s: float = 30.0) -> None:
        self.cooldown_failures = cooldown_failures
        self.cooldown_s = cooldown_s
        self.local: dict[RouteKey, RouteFigures] = {}
        self.view: dict[RouteKey, RouteFigures] = self.local
        self.shared = False
        self.worker = worker_id()
        self.generation = 0
        self._failures: dict[str, int] = {}
        self._cooled_until: dict[str, float] = {}  # provider → time.monotonic()

    # -- the hot path ---------------------------------------------------------------------

    def observe(
        self,
        provider: str,
        model: str,
        failed: bool,
        ttft_ms: float | None,
        latency_ms: float | None,
    ) -> None:
        """One attempt's outcome. Latencies of a failure are not the provider's speed."""
        now = time.time()
        key = (provider, model)
        figures = self.local.get(key)
        if figures is None:
            figures = self.local[key] = RouteFigures(0.0, 0.0, None, None, now)
            self.generation += 1
        figures.error_rate = figures.error_at(now)
        weight = max(ALPHA, 1.0 / (figures.samples + 1.0))
        figures.samples += 1.0
        figures.updated = now
        figures.error_rate += weight * (float(failed) - figures.error_rate)
        if not failed:
            if ttft_ms is not None:
                figures.ttft_ms = _ewma(figures.ttft_ms, ttft_ms, weight)
            if latency_ms is not None:
                figures.latency_ms = _ewma(figures.latency_ms, latency_ms, weight)
        self._count_failure(provider, failed)

    def _count_failure(self, provider: str, failed: bool) -> None:
        if not failed:
            if self._failures.get(provider):
                self._failures[provider] = 0
                self._cooled_until.pop(provider, None)
                self.generation += 1
            return
        self.generation += 1
        count = self._failures[provider] = self._failures.get(provider, 0) + 1
        if count >= self.cooldown_failures:
            self._cooled_until[provider] = time.monotonic() + self.cooldown_s

    def cooling(self) -> bool:
        """Whether any provider may be cooling down (`cooled` says which): a cheap test the
        ranking of every routed request makes first."""
        return bool(self._cooled_until)

    def cooled(self, provider: str) -> bool:
        """Whether `provider` is passed over now (cooling down after repeated failures)."""
        until = self._cooled_until.get(provider)
        return until is not None and time.monotonic() < until

    # -- seeding and reading -------------------------------------------------------------

    def seed(self, key: RouteKey, figures: RouteFigures) -> None:
        """Figures from the ledger, for a route this process has not observed yet."""
        self.local.setdefault(key, figures)
        self.generation += 1

    def replace_view(self, view: dict[RouteKey, RouteFigures]) -> None:
        """Route by `view` from now on: the merge of every worker's figures."""
        self.view = view
        self.generation += 1

    def health(self) -> list[tuple[str, int, float | None]]:
        """(provider, consecutive failures, seconds of cooldown left or None) per provider."""
        now = time.monotonic()
        out = []
        for provider in sorted(set(self._failures) | set(self._cooled_until)):
            until = self._cooled_until.get(provider)
            left = until - now if until is not None and until > now else None
            out.append((provider, self._failures.get(provider, 0), left))
        return out

    def report(self) -> dict[str, object]:
        """What GET /billing/routing/stats shows (service/routing/schemas.py: RoutingStatsPage):
        the figures routing reads, each as of its route's last observation."""
        now = time.time()
        return {
            "worker": self.worker,
            "shared": self.shared,
            "data": [
                {
                    "provider": provider,
                    "model": model,
                    "samples": f.samples,
                    "error_rate": f.error_rate,
                    "ttft_ms": f.ttft_ms,
                    "latency_ms": f.latency_ms,
                }
                for (provider, model), f in sorted(self.view.items())
            ],
            "providers": [
                {
                    "provider": provider,
                    "consecutive_failures": failures,
                    "cooled_down_until": None
                    if left is None
                    else datetime.fromtimestamp(now + left, UTC).isoformat(),
                }
                for provider, failures, left in self.health()
            ],
        }
