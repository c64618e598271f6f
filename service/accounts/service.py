"""Accounts and their API keys.

Who may do what: the admin everything. A customer key may read its own account and list its
own account's keys; changing the account, creating keys and revoking them are the admin's
(a leaked key must not be able to mint keys for itself or lock its owner out). Asking for
another account's objects answers 404, as if they did not exist; asking to change one's own
answers 403, since its existence is no secret to the caller.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncSession

from service.accounts.repository import AccountRepository
from service.accounts.schemas import (
    RATE_CARD_FIELDS,
    AccountCreate,
    AccountOut,
    AccountUpdate,
    KeyCreated,
    KeyOut,
    KeyUpdate,
)
from service.auth.keys import generate_key
from service.auth.principal import Principal
from service.db.models import Account, ApiKey, Tier, TierChange
from service.errors import Conflict, Forbidden, NotFound
from service.rate_cards import service as rate_cards
from service.schemas import Page, decode_cursor, keyset_page
from service.webhooks.events import EventType
from service.webhooks.outbox import raise_event

log = logging.getLogger("meterline.accounts")

# What the proxy reads with an account's credit (service/limits): a change is announced.
CREDIT_SETTINGS = frozenset({"billing_mode", "low_balance_threshold_usd"})


def _not_found(account_id: uuid.UUID) -> NotFound:
    return NotFound(f"account {account_id} not found", param="path.account_id")


def _admin_only(principal: Principal, action: str) -> None:
    if not principal.is_admin:
        raise Forbidden(f"a customer key cannot {action}; use the admin token")


async def account_out(session: AsyncSession, account: Account) -> AccountOut:
    """The account as the API shows it, with the rate card in force now."""
    out = AccountOut.model_validate(account)
    out.rate_card_id = (await rate_cards.rate_cards_now(session, [account.id])).get(account.id)
    return out


async def create_account(session: AsyncSession, data: AccountCreate) -> Account:
    account = Account(**data.model_dump(exclude=set(RATE_CARD_FIELDS)))
    await AccountRepository(session).add(account)
    if data.rate_card_id is not None:
        await rate_cards.assign(
            session, account.id, data.rate_card_id, data.rate_card_effective_from
        )
    log.info("event=account_created account_id=%s tier=%s", account.id, account.tier)
    return account


async def list_accounts(session: AsyncSession, limit: int, cursor: str | None) -> Page[AccountOut]:
    after = decode_cursor(cursor, datetime, uuid.UUID) if cursor else None
    rows = await AccountRepository(session).list_accounts(limit, after)
    cards = await rate_cards.rate_cards_now(session, [a.id for a in rows])
    return keyset_page(
        Page[AccountOut],
        rows,
        limit,
        lambda a: AccountOut.model_validate(a).model_copy(update={"rate_card_id": cards.get(a.id)}),
        lambda a: (a.created_at.isoformat(), str(a.id)),
    )


async def get_account(
    session: AsyncSession, principal: Principal, account_id: uuid.UUID
) -> Account:
    if not principal.is_admin and account_id != principal.account_id:
        raise _not_found(account_id)
    account = await AccountRepository(session).get_account(account_id)
    if account is None:
        raise _not_found(account_id)
    return account


async def accounts_by_id(
    session: AsyncSession, principal: Principal, account_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, Account]:
    """The accounts among `account_ids` the caller may see (a customer: its own only)."""
    visible = [a for a in account_ids if principal.is_admin or a == principal.account_id]
    return {a.id: a for a in await AccountRepository(session).accounts_by_id(visible)}


async def keys_by_id(
    session: AsyncSession, principal: Principal, key_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, ApiKey]:
    """The keys among `key_ids` the caller may see (a customer: its own account's only)."""
    keys = await AccountRepository(session).keys_by_id(key_ids)
    return {k.id: k for k in keys if principal.is_admin or k.account_id == principal.account_id}


async def update_account(
    session: AsyncSession, principal: Principal, account_id: uuid.UUID, data: AccountUpdate
) -> Account:
    account = await get_account(session, principal, account_id)
    _admin_only(principal, "change an account")
    if "rate_card_id" in data.model_fields_set:
        await rate_cards.assign(
            session, account_id, data.rate_card_id, data.rate_card_effective_from
        )
    changes = data.changes()
    if not changes:
        return account
    repository = AccountRepository(session)
    tier = changes.pop("tier", account.tier)
    if tier != account.tier:
        await change_tier(session, account, tier, "admin", datetime.now(UTC))
    account = await repository.update_account(account, changes)
    if changes.keys() & CREDIT_SETTINGS:
        await repository.credit_settings_changed(account_id)
    log.info("event=account_updated account_id=%s fields=%s", account_id, ",".join(sorted(changes)))
    return account


async def change_tier(
    session: AsyncSession, account: Account, tier: Tier, reason: str, now: datetime
) -> None:
    """Move the account to `tier`, recorded in its history; every process's key directory
    applies the tier's limits as soon as the transaction commits."""
    repository = AccountRepository(session)
    before = account.tier
    await repository.add(
        TierChange(
            account_id=account.id,
            from_tier=before,
            to_tier=tier,
            reason=reason,
            changed_at=now,
        )
    )
    await repository.update_account(account, {"tier": tier})
    await repository.limits_changed(account.id)
    log.info(
        "event=tier_changed account_id=%s from=%s to=%s reason=%s",
        account.id,
        before,
        tier,
        reason,
    )
    # Raised here, the one place a tier changes, in the transaction that changes it.
    await raise_event(
        session,
        EventType.ACCOUNT_TIER_CHANGED,
        {"account_id": str(account.id), "from_tier": before, "to_tier": tier, "reason": reason},
        account.id,
    )


async def tier_changes(
    session: AsyncSession, principal: Principal, account_id: uuid.UUID
) -> Sequence[TierChange]:
    await get_account(session, principal, account_id)
    return await AccountRepository(session).tier_changes(account_id)


async def create_key(
    session: AsyncSession,
    account_id: uuid.UUID,
    name: str | None = None,
    expires_at: datetime | None = None,
    principal: Principal | None = None,
) -> KeyCreated:
    repository = AccountRepository(session)
    if principal is not None:
        await get_account(session, principal, account_id)
        _admin_only(principal, "create keys")
    elif await repository.get_account(account_id) is None:
        raise _not_found(account_id)
    new = generate_key()
    key = ApiKey(
        account_id=account_id,
        name=name,
        prefix=new.prefix,
        key_hash=new.key_hash,
        expires_at=expires_at,
    )
    await repository.add(key)
    log.info("event=key_created account_id=%s key_id=%s", account_id, key.id)
    return KeyCreated(**KeyOut.model_validate(key).model_dump(), key=new.plaintext)


def _key_out(key: ApiKey, last_used_at: datetime | None) -> KeyOut:
    return KeyOut(
        id=key.id,
        account_id=key.account_id,
        name=key.name,
        prefix=key.prefix,
        created_at=key.created_at,
        last_used_at=last_used_at,
        revoked_at=key.revoked_at,
        expires_at=key.expires_at,
        rate_limit_rpm=key.rate_limit_rpm,
        rate_limit_tpm=key.rate_limit_tpm,
        monthly_budget_usd=key.monthly_budget_usd,
    )


async def list_keys(
    session: AsyncSession,
    principal: Principal,
    account_id: uuid.UUID,
    limit: int,
    cursor: str | None,
) -> Page[KeyOut]:
    await get_account(session, principal, account_id)
    after = decode_cursor(cursor, datetime, uuid.UUID) if cursor else None
    rows = await AccountRepository(session).list_keys(account_id, limit, after)
    return keyset_page(
        Page[KeyOut],
        rows,
        limit,
        lambda row: _key_out(*row),
        lambda row: (row[0].created_at.isoformat(), str(row[0].id)),
    )


def _key_not_found(key_id: uuid.UUID) -> NotFound:
    return NotFound(f"key {key_id} not found", param="path.key_id")


class KeyRevoked(Conflict):
    code = "key_revoked"
    description = "The key is revoked: it never works again, and its settings stay as they were."


async def update_key(
    session: AsyncSession, principal: Principal, key_id: uuid.UUID, data: KeyUpdate
) -> KeyOut:
    """Change the key's name, limits, budget or expiry. Every proxy applies the change at
    its next reload of the key directory, which the change's notification starts at once
    (and which runs every `key_cache_refresh_s` anyway)."""
    repository = AccountRepository(session)
    key = await repository.get_key(key_id)
    if key is None or (not principal.is_admin and key.account_id != principal.account_id):
        raise _key_not_found(key_id)
    _admin_only(principal, "change keys")
    if key.revoked_at is not None:
        raise KeyRevoked(f"key {key_id} is revoked; create a new key")
    changes = data.changes()
    if changes:
        key = await repository.update_key(key, changes)
        log.info(
            "event=key_updated account_id=%s key_id=%s fields=%s",
            key.account_id,
            key.id,
            ",".join(sorted(changes)),
        )
    return _key_out(key, await repository.last_used_at(key.id))


async def revoke_key(session: AsyncSession, principal: Principal, key_id: uuid.UUID) -> KeyOut:
    repository = AccountRepository(session)
    key = await repository.get_key(key_id)
    if key is None or (not principal.is_admin and key.account_id != principal.account_id):
        raise _key_not_found(key_id)
    _admin_only(principal, "revoke keys")
    already = key.revoked_at is not None
    key = await repository.revoke_key(key)
    if not already:
        log.info("event=key_revoked account_id=%s key_id=%s", key.account_id, key.id)
    return _key_out(key, await repository.last_used_at(key.id))
