from __future__ import annotations

import uuid

from fastapi import APIRouter, status

from service.deps import Budgets, Caller, Config, Guard, Prices, Routes, Session
from service.errors import API_ERRORS, errors
from service.limits.policy import BudgetExhausted, BudgetUnavailable, InsufficientCredits
from service.quotes import service
from service.quotes.schemas import QuoteAccept, QuoteCreate, QuoteOut
from service.schemas import links
from service.tasks.schemas import TaskOut
from service.tasks.service import TaskIdInUse

router = APIRouter(prefix="/billing/quotes", tags=["quotes"], responses=errors(*API_ERRORS))


QUOTE = {"path.quote_id": "$response.body#/id"}
TASK = {"path.task_id": "$response.body#/id", "query.account_id": "$response.body#/account_id"}


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=QuoteOut,
    responses={
        **errors(*API_ERRORS, service.ModelNotPriced, service.QuoteNeedsEstimateInputs),
        201: links(
            GetQuote=("GET", "/billing/quotes/{quote_id}", QUOTE),
            AcceptQuote=("POST", "/billing/quotes/{quote_id}/accept", QUOTE),
        ),
    },
)
async def create_quote(
    data: QuoteCreate,
    session: Session,
    caller: Caller,
    settings: Config,
    prices: Prices,
    routes: Routes,
) -> QuoteOut:
    """Price one task of `task_type` on `model` in advance (from history, else an estimate
    at what the provider charges where known, else at list price)."""
    provider = routes.route(data.model)
    return await service.create_quote(
        session,
        settings,
        prices.book,
        caller,
        data,
        tariff=prices.tariff,
        provider=provider.name if provider is not None else None,
    )


@router.get("/{quote_id}", response_model=QuoteOut)
async def get_quote(quote_id: uuid.UUID, session: Session, caller: Caller) -> QuoteOut:
    return await service.get_quote(session, caller, quote_id)


@router.post(
    "/{quote_id}/accept",
    status_code=status.HTTP_201_CREATED,
    response_model=TaskOut,
    responses={
        **errors(
            *API_ERRORS,
            service.QuoteAlreadyAccepted,
            TaskIdInUse,
            service.QuoteExpired,
            BudgetExhausted,
            BudgetUnavailable,
            InsufficientCredits,
        ),
        201: links(
            GetTask=("GET", "/billing/tasks/{task_id}", TASK),
            CompleteTask=("POST", "/billing/tasks/{task_id}/complete", TASK),
        ),
    },
)
async def accept_quote(
    quote_id: uuid.UUID,
    session: Session,
    caller: Caller,
    settings: Config,
    guard: Guard,
    budgets: Budgets,
    data: QuoteAccept | None = None,
) -> TaskOut:
    """Open a task bound to the quote's fixed price; send its id as `X-Task-Id`.

    The fixed price is reserved against the account's monthly budget (429
    `insufficient_quota` when the budget cannot pay it)."""
    async with budgets.quote_acceptance(session, quote_id):
        return await service.accept_quote(
            session, settings, guard, caller, quote_id, data or QuoteAccept()
        )
