from __future__ import annotations

import uuid
from functools import partial

from fastapi import APIRouter, status

from service.accounts import service
from service.accounts.schemas import (
    AccountCreate,
    AccountOut,
    AccountUpdate,
    KeyCreate,
    KeyCreated,
    KeyOut,
    KeyUpdate,
    TierChangeOut,
    TierChanges,
)
from service.db.session import after_commit
from service.deps import Admin, Caller, Keys, Prices, Session
from service.errors import API_ERRORS, Forbidden, errors
from service.rate_cards import service as rate_cards
from service.rate_cards.schemas import RateCardAssignmentList
from service.schemas import CursorParam, Limit, Page, links

# A customer key may read its own account, not change it or its keys.
FORBIDDEN = errors(*API_ERRORS, Forbidden)

router = APIRouter(prefix="/billing", tags=["accounts"], responses=errors(*API_ERRORS))


ACCOUNT = {"path.account_id": "$response.body#/id"}


@router.post(
    "/accounts",
    status_code=status.HTTP_201_CREATED,
    response_model=AccountOut,
    responses={
        201: links(
            GetAccount=("GET", "/billing/accounts/{account_id}", ACCOUNT),
            UpdateAccount=("PATCH", "/billing/accounts/{account_id}", ACCOUNT),
            CreateKey=("POST", "/billing/accounts/{account_id}/keys", ACCOUNT),
            ListKeys=("GET", "/billing/accounts/{account_id}/keys", ACCOUNT),
            AdjustAccount=("POST", "/billing/accounts/{account_id}/adjustments", ACCOUNT),
            AccountUsage=("GET", "/billing/usage", {"query.account_id": "$response.body#/id"}),
        )
    },
)
async def create_account(
    data: AccountCreate, session: Session, prices: Prices, _: Admin
) -> AccountOut:
    """Create a customer account (admin)."""
    account = await service.create_account(session, data)
    if data.rate_card_id is not None:
        # Durable first, then this worker prices by the assignment at once.
        after_commit(session, prices.refresh)
    return await service.account_out(session, account)


@router.get("/accounts", response_model=Page[AccountOut])
async def list_accounts(
    session: Session, _: Admin, limit: Limit = 50, cursor: CursorParam = None
) -> Page[AccountOut]:
    """All accounts, oldest first, a page at a time (admin)."""
    return await service.list_accounts(session, limit, cursor)


@router.get("/accounts/{account_id}", response_model=AccountOut)
async def get_account(account_id: uuid.UUID, session: Session, caller: Caller) -> AccountOut:
    """One account: any account for the admin, its own for a customer key."""
    account = await service.get_account(session, caller, account_id)
    return await service.account_out(session, account)


@router.patch(
    "/accounts/{account_id}",
    response_model=AccountOut,
    responses=errors(*API_ERRORS, Forbidden, rate_cards.AssignmentExists),
)
async def update_account(
    account_id: uuid.UUID, data: AccountUpdate, session: Session, caller: Caller, prices: Prices
) -> AccountOut:
    """Change the fields sent (admin); `null` clears an optional one. `rate_card_id` adds
    an assignment from `rate_card_effective_from` (default now) on, keeping the history."""
    account = await service.update_account(session, caller, account_id, data)
    if "rate_card_id" in data.model_fields_set:
        after_commit(session, prices.refresh)
    return await service.account_out(session, account)


@router.get("/accounts/{account_id}/rate-cards", response_model=RateCardAssignmentList)
async def list_rate_card_assignments(
    account_id: uuid.UUID, session: Session, caller: Caller
) -> RateCardAssignmentList:
    """Which rate card the account paid by from when (oldest first); its own for a key."""
    await service.get_account(session, caller, account_id)
    return RateCardAssignmentList(data=await rate_cards.assignments(session, account_id))


@router.post(
    "/accounts/{account_id}/keys",
    status_code=status.HTTP_201_CREATED,
    response_model=KeyCreated,
    responses={
        **FORBIDDEN,
        201: links(
            RevokeKey=("DELETE", "/billing/keys/{key_id}", {"path.key_id": "$response.body#/id"}),
            UpdateKey=("PATCH", "/billing/keys/{key_id}", {"path.key_id": "$response.body#/id"}),
            KeyUsage=("GET", "/billing/usage", {"query.key_id": "$response.body#/id"}),
        ),
    },
)
async def create_key(
    account_id: uuid.UUID, data: KeyCreate, session: Session, caller: Caller
) -> KeyCreated:
    """Create an API key (admin). The response is the only time the key itself is shown."""
    return await service.create_key(session, account_id, data.name, data.expires_at, caller)


@router.get("/accounts/{account_id}/keys", response_model=Page[KeyOut])
async def list_keys(
    account_id: uuid.UUID,
    session: Session,
    caller: Caller,
    limit: Limit = 50,
    cursor: CursorParam = None,
) -> Page[KeyOut]:
    """An account's keys, oldest first, revoked and expired ones included (never the key)."""
    return await service.list_keys(session, caller, account_id, limit, cursor)


@router.patch(
    "/keys/{key_id}",
    response_model=KeyOut,
    responses=errors(*API_ERRORS, Forbidden, service.KeyRevoked),
)
async def update_key(
    key_id: uuid.UUID, data: KeyUpdate, session: Session, caller: Caller
) -> KeyOut:
    """Change a key's name, limits, monthly budget or expiry (admin); fields left out stay
    as they are, `null` clears one. The proxy applies the change within
    `METERLINE_KEY_CACHE_REFRESH_S` (at once, normally: the change notifies every worker)."""
    return await service.update_key(session, caller, key_id, data)


@router.delete("/keys/{key_id}", response_model=KeyOut, responses=FORBIDDEN)
async def revoke_key(key_id: uuid.UUID, session: Session, caller: Caller, keys: Keys) -> KeyOut:
    """Revoke a key (admin). Idempotent; the proxy refuses the key from this response on."""
    key = await service.revoke_key(session, caller, key_id)
    # Every worker drops the key when the NOTIFY sent in this transaction reaches it. This
    # worker does not wait for its own copy: once the revocation is durable it forgets the
    # key itself, so a client's next request here is refused however loaded the host is.
    after_commit(session, partial(keys.revoke, key.id))
    return key


@router.get("/accounts/{account_id}/tier-changes", response_model=TierChanges)
async def tier_changes(account_id: uuid.UUID, session: Session, caller: Caller) -> TierChanges:
    """The account's tier history, oldest first (admin, or the account's own key)."""
    changes = await service.tier_changes(session, caller, account_id)
    return TierChanges(data=[TierChangeOut.model_validate(c) for c in changes])
