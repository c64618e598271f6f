"""Prepaid credit: grants put on an account, its balance, its transactions, voids, and the
pro tier reached by deposit.

Who may do what: the admin everything; a customer key reads its own account's balance and
transactions (another account's answers 404).

Every change of an account's grants tells every process (`credits_changed`), whose proxy
then reads that account's credit from the ledger again before admitting its next request.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, time, timedelta
from decimal import Decimal

from sqlalchemy.ext.asyncio import AsyncSession

from pricing.credits import Movement, consumption_order
from pricing.prices import PriceBook
from service.accounts import service as accounts
from service.accounts.repository import AccountRepository
from service.auth.principal import Principal
from service.credits.repository import CreditRepository
from service.credits.schemas import (
    BalanceOut,
    CreditCreate,
    CreditGrantOut,
    CreditTransaction,
    CreditTransactions,
    GrantStatus,
    TransactionKind,
)
from service.db.channels import Channel, notify
from service.db.models import BillingMode, CreditGrant, CreditKind, Tier
from service.errors import Conflict, NotFound
from service.limits.credit import CreditLedger, credit_ledger
from service.schemas import decode_cursor, keyset_page

log = logging.getLogger("meterline.credits")

# (reserved, settled but not yet in the ledger) nano-USD of a prepaid account's counter,
# given what the ledger shows it spent; None when the counters cannot say.
CounterState = Callable[[uuid.UUID, Decimal], Awaitable[Decimal | None]]


def _grant_not_found(grant_id: uuid.UUID) -> NotFound:
    return NotFound(f"credit grant {grant_id} not found", param="path.grant_id")


async def _announce(session: AsyncSession, account_id: uuid.UUID) -> None:
    await notify(session, Channel.CREDITS, str(account_id))


async def add_credit(
    session: AsyncSession,
    account_id: uuid.UUID,
    data: CreditCreate,
    now: datetime,
    pro_tier_min_deposit: Decimal,
) -> CreditGrant:
    """Put credit on the account (admin). A purchase that brings what the account bought to
    `pro_tier_min_deposit` moves a basic account to pro in the same transaction."""
    account = await AccountRepository(session).lock_account(account_id)
    if account is None:
        raise NotFound(f"account {account_id} not found", param="path.account_id")
    repository = CreditRepository(session)
    grant = CreditGrant(
        account_id=account_id,
        kind=data.kind,
        amount_usd=data.amount_usd,
        priority=data.priority,
        expires_at=data.expires_at,
        reference=data.reference,
        created_at=now,
    )
    await repository.add(grant)
    await _announce(session, account_id)
    log.info(
        "event=credit_added account_id=%s grant_id=%s kind=%s amount_usd=%s",
        account_id,
        grant.id,
        grant.kind,
        grant.amount_usd,
    )
    deposit = data.kind is CreditKind.PURCHASE and account.tier is Tier.BASIC
    if deposit and await repository.purchased_usd(account_id) >= pro_tier_min_deposit:
        await accounts.change_tier(session, account, Tier.PRO, "deposit", now)
    return grant


def _status(grant: CreditGrant, now: datetime) -> GrantStatus:
    if grant.voided_at is not None and grant.voided_at <= now:
        return GrantStatus.VOIDED
    if grant.expires_at is not None and grant.expires_at <= now:
        return GrantStatus.EXPIRED
    return GrantStatus.ACTIVE


def grant_out(grant: CreditGrant, remaining: Decimal, now: datetime) -> CreditGrantOut:
    return CreditGrantOut(
        id=grant.id,
        account_id=grant.account_id,
        kind=grant.kind,
        amount_usd=grant.amount_usd,
        remaining_usd=remaining,
        priority=grant.priority,
        expires_at=grant.expires_at,
        voided_at=grant.voided_at,
        reference=grant.reference,
        created_at=grant.created_at,
        status=_status(grant, now),
    )


async def _ledger(
    session: AsyncSession,
    principal: Principal,
    account_id: uuid.UUID,
    now: datetime,
    book: PriceBook,
    per_day: bool = False,
) -> tuple[BillingMode, CreditLedger]:
    account = await accounts.get_account(session, principal, account_id)
    connection = await session.connection()
    ledger = await credit_ledger(connection, account_id, now, book)
    if per_day and ledger.cuts:
        ledger = await credit_ledger(
            connection, account_id, now, book, _midnights(ledger.cuts[0], now)
        )
    return account.billing_mode, ledger


def _midnights(start: datetime, end: datetime) -> list[datetime]:
    day = datetime.combine(start.astimezone(UTC).date(), time(), UTC) + timedelta(days=1)
    days = []
    while day < end:
        days.append(day)
        day += timedelta(days=1)
    return days


async def balance(
    session: AsyncSession,
    principal: Principal,
    account_id: uuid.UUID,
    now: datetime,
    book: PriceBook,
    in_flight: CounterState,
) -> BalanceOut:
    mode, ledger = await _ledger(session, principal, account_id, now, book)
    held = (
        await in_flight(account_id, ledger.allocation.usage)
        if mode is BillingMode.PREPAID
        else None
    )
    reserved = held or Decimal(0)
    by_id = {row.id: row for row in ledger.grants}
    grants = [
        grant_out(by_id[c.id], ledger.allocation.remaining.get(c.id, Decimal(0)), now)
        for c in consumption_order(ledger.credits)
    ]
    return BalanceOut(
        account_id=account_id,
        billing_mode=mode.value,
        balance_usd=ledger.balance,
        reserved_usd=reserved,
        available_usd=max(ledger.balance - reserved, Decimal(0)),
        uncovered_usd=ledger.allocation.uncovered,
        grants=grants,
    )


_KIND_ORDER = {
    TransactionKind.GRANT: 0,
    TransactionKind.DRAWDOWN: 1,
    TransactionKind.EXPIRY: 2,
    TransactionKind.VOID: 2,
}


def _transactions(ledger: CreditLedger) -> list[CreditTransaction]:
    out = [
        CreditTransaction(
            id=f"grant_{row.id}",
            kind=TransactionKind.GRANT,
            grant_id=row.id,
            amount_usd=row.amount_usd,
            occurred_at=row.created_at,
        )
        for row in ledger.grants
    ]
    drawn: dict[tuple[uuid.UUID, str], tuple[datetime, Decimal]] = {}
    for move in ledger.allocation.movements:
        if move.kind is Movement.DRAWDOWN:
            day = move.start.astimezone(UTC).date().isoformat()
            first, amount = drawn.get((move.credit_id, day), (move.start, Decimal(0)))
            drawn[(move.credit_id, day)] = (min(first, move.start), amount + move.amount)
        else:
            kind = TransactionKind.VOID if move.kind is Movement.VOID else TransactionKind.EXPIRY
            out.append(
                CreditTransaction(
                    id=f"{kind.value}_{move.credit_id}",
                    kind=kind,
                    grant_id=move.credit_id,
                    amount_usd=-move.amount,
                    occurred_at=move.start,
                )
            )
    for (grant_id, day), (first, amount) in drawn.items():
        out.append(
            CreditTransaction(
                id=f"drawdown_{grant_id}_{day}",
                kind=TransactionKind.DRAWDOWN,
                grant_id=grant_id,
                amount_usd=-amount,
                occurred_at=first,
                day=day,
            )
        )
    out.sort(key=_position)
    return out


def _position(row: CreditTransaction) -> tuple[datetime, str]:
    """The list's order: by time, a grant before what it pays on the same instant."""
    return row.occurred_at, f"{_KIND_ORDER[row.kind]}:{row.id}"


async def transactions(
    session: AsyncSession,
    principal: Principal,
    account_id: uuid.UUID,
    now: datetime,
    book: PriceBook,
    limit: int,
    cursor: str | None,
) -> CreditTransactions:
    """Oldest first: every grant, what each paid per UTC day, what each lost when it
    expired or was voided. Today's drawdowns grow until the day ends."""
    _, ledger = await _ledger(session, principal, account_id, now, book, per_day=True)
    rows = _transactions(ledger)
    if cursor:
        after = decode_cursor(cursor, datetime, str)
        rows = [r for r in rows if _position(r) > after]
    return keyset_page(
        CreditTransactions,
        rows[: limit + 1],
        limit,
        lambda r: r,
        lambda r: (r.occurred_at.isoformat(), _position(r)[1]),
    )


async def void_credit(
    session: AsyncSession, grant_id: uuid.UUID, now: datetime, book: PriceBook
) -> CreditGrantOut:
    """Void what the grant still holds (admin): from now on it pays nothing."""
    repository = CreditRepository(session)
    grant = await repository.lock_grant(grant_id)
    if grant is None:
        raise _grant_not_found(grant_id)
    status = _status(grant, now)
    if status is not GrantStatus.ACTIVE:
        raise Conflict(f"credit grant {grant_id} is {status.value} already")
    grant.voided_at = now
    await session.flush()
    await _announce(session, grant.account_id)
    connection = await session.connection()
    ledger = await credit_ledger(connection, grant.account_id, now, book)
    lost = ledger.allocation.lapsed.get(grant.id, Decimal(0))
    log.info("event=credit_voided grant_id=%s voided_usd=%s", grant_id, lost)
    return grant_out(grant, Decimal(0), now)
