"""Every typed dependency of the billing API and the console, in one place.

An endpoint names what it needs — `session: Session`, `caller: Caller`, `prices: Prices` —
and never reaches into the running process itself. The process's long-lived parts are typed
by their protocols (service/parts.py), not by the classes of the composition root:
service/runtime.py imports the packages whose endpoints import this module, so importing it
here would close a cycle through every one of them. service/app.py hands the `Runtime` over
with `provide`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from service.auth.principal import Principal, presented_credential, principal_for
from service.db.session import commit
from service.errors import NotFound, Unauthorized
from service.parts import (
    BudgetHolds,
    HeldBreakdowns,
    KeyDirectory,
    LivePrices,
    LiveTasks,
    ModelRoutes,
    Parts,
    RoutingReport,
)
from service.settings import Settings


def provide(app: FastAPI, parts: Parts) -> None:
    """Make the running process's parts what this app's dependencies hand out."""
    app.state.runtime = parts


def _parts(request: Request) -> Parts:
    parts: Parts = request.app.state.runtime
    return parts


def _settings(request: Request) -> Settings:
    return _parts(request).settings


def _engine(request: Request) -> AsyncEngine:
    return _parts(request).engine


def _prices(request: Request) -> LivePrices:
    return _parts(request).prices


def _providers(request: Request) -> ModelRoutes:
    return _parts(request).providers


def _keys(request: Request) -> KeyDirectory:
    return _parts(request).keys


def _tasks(request: Request) -> LiveTasks:
    return _parts(request).tasks


def _limits(request: Request) -> BudgetHolds:
    return _parts(request).limits


def _routing_stats(request: Request) -> RoutingReport:
    return _parts(request).routing_stats


def _breakdowns(request: Request) -> HeldBreakdowns:
    return _parts(request).breakdowns


Config = Annotated[Settings, Depends(_settings)]
Engine = Annotated[AsyncEngine, Depends(_engine)]
Prices = Annotated[LivePrices, Depends(_prices)]
Keys = Annotated[KeyDirectory, Depends(_keys)]
Routes = Annotated[ModelRoutes, Depends(_providers)]
Guard = Annotated[LiveTasks, Depends(_tasks)]
Budgets = Annotated[BudgetHolds, Depends(_limits)]
RoutingFigures = Annotated[RoutingReport, Depends(_routing_stats)]
UsageCache = Annotated[HeldBreakdowns, Depends(_breakdowns)]


# -- the request's session ----------------------------------------------------------------


async def _session(request: Request) -> AsyncIterator[AsyncSession]:
    async with _parts(request).sessions() as session:
        yield session
        await commit(session)


# "function" scope: the commit (and what waits for it, service/db/session.py) runs before
# the response is sent, so a client never sees a success (a revoked key, a finalized
# invoice) that is not yet durable — or that then fails.
Session = Annotated[AsyncSession, Depends(_session, scope="function")]


# -- who is calling -----------------------------------------------------------------------


async def _caller(request: Request, session: Session, settings: Config) -> Principal:
    token = presented_credential(request)
    if token is None:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    return await principal_for(session, token, settings.admin_token)


async def _admin(principal: Annotated[Principal, Depends(_caller)]) -> Principal:
    if not principal.is_admin:
        # Admin-only resources do not exist for a customer key.
        raise NotFound("not found")
    return principal


Caller = Annotated[Principal, Depends(_caller)]
Admin = Annotated[Principal, Depends(_admin)]
