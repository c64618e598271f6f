"""The running process's long-lived parts, as the billing API and its services use them.

Each part is declared by what is used of it (a protocol), beneath every package: the
endpoints (through service/deps.py) and the services they hand a part to name these, never
the classes in service/runtime.py's packages, so no package imports the composition root
or closes a cycle through it. service/app.py hands the `Runtime` over, and mypy checks
there that it has every part below.
"""

from __future__ import annotations

import uuid
from collections.abc import Hashable
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from decimal import Decimal
from typing import Any, Protocol

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from pricing.prices import PriceBook
from pricing.rate_cards import Tariff
from service.providers.config import Provider
from service.settings import Settings


class LivePrices(Protocol):
    """The price book this worker prices requests with (service/prices/cache.py)."""

    @property
    def book(self) -> PriceBook: ...

    @property
    def tariff(self) -> Tariff: ...

    async def refresh(self) -> None: ...


class ModelRoutes(Protocol):
    """Which provider serves a model (service/providers/router.py)."""

    def route(self, model: str) -> Provider | None: ...


class KeyDirectory(Protocol):
    """The keys this worker's proxy accepts (service/auth/key_cache.py)."""

    def revoke(self, key_id: uuid.UUID) -> None: ...


class LiveTasks(Protocol):
    """This worker's view of open and closed tasks, which the proxy admits requests by
    (service/tasks/guard.py): told at once of the changes this worker makes."""

    def mark_closed(self, account_id: uuid.UUID, task_id: str) -> None: ...

    def mark_open_quoted(
        self,
        account_id: uuid.UUID,
        task_id: str,
        model: str,
        accepted_at: datetime,
        cap: Decimal,
        expires_at: datetime | None = None,
    ) -> None: ...


class BudgetHolds(Protocol):
    """The budget counters an accepted quote's fixed price is held against, and the credit
    counters of prepaid accounts (service/limits/service.py)."""

    def quote_acceptance(
        self, session: AsyncSession, quote_id: uuid.UUID
    ) -> AbstractAsyncContextManager[None]: ...

    def credits_changed(self, account_id: uuid.UUID) -> None: ...

    async def credits_in_flight(
        self, account_id: uuid.UUID, ledger_usage: Decimal
    ) -> Decimal | None: ...


class RoutingReport(Protocol):
    """This worker's routing statistics (service/routing/stats.py)."""

    def report(self) -> dict[str, object]: ...


class HeldBreakdowns(Protocol):
    """Usage breakdowns read from the daily rollup, kept by this worker with the watermark
    they hold the ledger up to (service/usage/cache.py)."""

    @property
    def tail_rows(self) -> int: ...

    def get(self, key: Hashable, /) -> Any: ...

    def put(self, key: Hashable, value: Any, /) -> None: ...

    def drop(self, key: Hashable, /) -> None: ...


class Parts(Protocol):
    """What service/deps.py hands out, under the names `Runtime` gives its parts."""

    @property
    def settings(self) -> Settings: ...
    @property
    def engine(self) -> AsyncEngine: ...
    @property
    def sessions(self) -> async_sessionmaker[AsyncSession]: ...
    @property
    def prices(self) -> LivePrices: ...
    @property
    def keys(self) -> KeyDirectory: ...
    @property
    def providers(self) -> ModelRoutes: ...
    @property
    def tasks(self) -> LiveTasks: ...
    @property
    def limits(self) -> BudgetHolds: ...
    @property
    def routing_stats(self) -> RoutingReport: ...
    @property
    def breakdowns(self) -> HeldBreakdowns: ...
