from __future__ import annotations

import uuid
from datetime import UTC, datetime

from fastapi import APIRouter, status

from service.credits import service
from service.credits.schemas import BalanceOut, CreditCreate, CreditGrantOut, CreditTransactions
from service.db.session import after_commit
from service.deps import Admin, Budgets, Caller, Config, Prices, Session
from service.errors import API_ERRORS, Conflict, errors
from service.idempotency.service import IdempotencyKeyHeader, IdempotencyKeyReused, idempotent
from service.schemas import CursorParam, Limit

router = APIRouter(prefix="/billing", tags=["credits"], responses=errors(*API_ERRORS))


ADD_CREDIT = "POST /billing/accounts/{account_id}/credits"


@router.post(
    "/accounts/{account_id}/credits",
    status_code=status.HTTP_201_CREATED,
    response_model=CreditGrantOut,
    responses=errors(*API_ERRORS, IdempotencyKeyReused),
)
async def add_credit(
    account_id: uuid.UUID,
    data: CreditCreate,
    session: Session,
    _: Admin,
    settings: Config,
    budgets: Budgets,
    idempotency_key: IdempotencyKeyHeader = None,
) -> CreditGrantOut:
    """Put credit on an account (admin): bought (`purchase`) or given (`grant`). A purchase
    that brings what a basic account bought to `METERLINE_PRO_TIER_MIN_DEPOSIT_USD` moves it
    to the pro tier at once. With an `Idempotency-Key`, a retry adds nothing and gets the
    first answer."""
    return await add_credit_once(session, account_id, data, idempotency_key, settings, budgets)


async def add_credit_once(
    session: Session,
    account_id: uuid.UUID,
    data: CreditCreate,
    idempotency_key: str | None,
    settings: Config,
    budgets: Budgets,
) -> CreditGrantOut:
    """The grant, once per idempotency key; the proxy reads the account's credit again once
    it is committed. The API's and the console's one way to put credit on an account."""
    now = datetime.now(UTC)

    async def add() -> CreditGrantOut:
        grant = await service.add_credit(
            session, account_id, data, now, settings.pro_tier_min_deposit_usd
        )
        after_commit(session, lambda: budgets.credits_changed(account_id))
        return service.grant_out(grant, grant.amount_usd, now)

    request = {"account_id": str(account_id), "body": data.model_dump(mode="json")}
    return await idempotent(session, ADD_CREDIT, idempotency_key, request, add, CreditGrantOut)


@router.get("/accounts/{account_id}/balance", response_model=BalanceOut)
async def balance(
    account_id: uuid.UUID, session: Session, caller: Caller, prices: Prices, budgets: Budgets
) -> BalanceOut:
    """The account's credit now (admin, or the account's own key): what its active grants
    hold after the ledger's costs, what requests in flight hold, and each grant."""
    return await service.balance(
        session, caller, account_id, datetime.now(UTC), prices.book, budgets.credits_in_flight
    )


@router.get("/accounts/{account_id}/credit-transactions", response_model=CreditTransactions)
async def credit_transactions(
    account_id: uuid.UUID,
    session: Session,
    caller: Caller,
    prices: Prices,
    limit: Limit = 50,
    cursor: CursorParam = None,
) -> CreditTransactions:
    """Every grant, what each paid per UTC day, and what each lost when it expired or was
    voided, oldest first, a page at a time (admin, or the account's own key)."""
    return await service.transactions(
        session, caller, account_id, datetime.now(UTC), prices.book, limit, cursor
    )


@router.delete(
    "/credits/{grant_id}", response_model=CreditGrantOut, responses=errors(*API_ERRORS, Conflict)
)
async def void_credit(
    grant_id: uuid.UUID, session: Session, _: Admin, prices: Prices, budgets: Budgets
) -> CreditGrantOut:
    """Void what a grant still holds (admin); what it already paid stays paid."""
    voided = await service.void_credit(session, grant_id, datetime.now(UTC), prices.book)
    after_commit(session, lambda: budgets.credits_changed(voided.account_id))
    return voided
