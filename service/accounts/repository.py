from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, tuple_, update

from service.db.channels import KEY_CHANGED, Channel, notify
from service.db.models import Account, ApiKey, TierChange, UsageRecord
from service.db.repository import Repository


class AccountRepository(Repository):
    async def add(self, obj: Account | ApiKey | TierChange) -> None:
        self.session.add(obj)
        await self.session.flush()
        await self.session.refresh(obj)

    async def get_account(self, account_id: uuid.UUID) -> Account | None:
        return await self.session.get(Account, account_id)

    async def list_accounts(
        self, limit: int, after: tuple[datetime, uuid.UUID] | None
    ) -> Sequence[Account]:
        """Oldest first, keyset-paginated on (created_at, id); `limit + 1` rows tell more exist."""
        statement = select(Account).order_by(Account.created_at, Account.id).limit(limit + 1)
        if after is not None:
            statement = statement.where(tuple_(Account.created_at, Account.id) > tuple_(*after))
        return (await self.session.scalars(statement)).all()

    async def update_account(self, account: Account, changes: dict[str, Any]) -> Account:
        for field, value in changes.items():
            setattr(account, field, value)
        await self.session.flush()
        # `updated_at` is set by the database (onupdate=now()); read it back.
        await self.session.refresh(account)
        return account

    async def lock_account(self, account_id: uuid.UUID) -> Account | None:
        """The account, locked until the transaction ends (its credits change with it)."""
        statement = select(Account).where(Account.id == account_id).with_for_update()
        return (await self.session.scalars(statement)).first()

    async def tier_changes(self, account_id: uuid.UUID) -> Sequence[TierChange]:
        statement = (
            select(TierChange)
            .where(TierChange.account_id == account_id)
            .order_by(TierChange.changed_at, TierChange.id)
        )
        return (await self.session.scalars(statement)).all()

    async def limits_changed(self, account_id: uuid.UUID) -> None:
        """Tell every process's key directory to reload this account's limits on commit."""
        await notify(self.session, Channel.KEYS, KEY_CHANGED)

    async def credit_settings_changed(self, account_id: uuid.UUID) -> None:
        """Tell every process's proxy to read this account's credit, billing mode and
        low-balance threshold again on commit (a threshold now above the balance is told)."""
        await notify(self.session, Channel.CREDITS, str(account_id))

    async def accounts_by_id(self, account_ids: Sequence[uuid.UUID]) -> list[Account]:
        if not account_ids:
            return []
        statement = select(Account).where(Account.id.in_(list(account_ids)))
        return list((await self.session.scalars(statement)).all())

    async def keys_by_id(self, key_ids: Sequence[uuid.UUID]) -> list[ApiKey]:
        if not key_ids:
            return []
        statement = select(ApiKey).where(ApiKey.id.in_(list(key_ids)))
        return list((await self.session.scalars(statement)).all())

    async def get_key(self, key_id: uuid.UUID) -> ApiKey | None:
        return await self.session.get(ApiKey, key_id)

    @staticmethod
    def _last_used_subquery() -> Any:
        return (
            select(UsageRecord.occurred_at)
            .where(
                UsageRecord.account_id == ApiKey.account_id,
                UsageRecord.key_id == ApiKey.id,
                # No row predates its key; the day's slack covers clock skew between the
                # server that stamps occurred_at and the database that stamped created_at.
                UsageRecord.occurred_at >= ApiKey.created_at - timedelta(days=1),
            )
            .order_by(UsageRecord.occurred_at.desc())
            .limit(1)
            .correlate(ApiKey)
            .scalar_subquery()
        )

    async def last_used_at(self, key_id: uuid.UUID) -> datetime | None:
        statement = select(func.greatest(ApiKey.last_used_at, self._last_used_subquery())).where(
            ApiKey.id == key_id
        )
        return await self.session.scalar(statement)

    async def list_keys(
        self, account_id: uuid.UUID, limit: int, after: tuple[datetime, uuid.UUID] | None
    ) -> list[tuple[ApiKey, datetime | None]]:
        """An account's keys, oldest first, each with the time of its latest ledger row.

        `last_used_at` is not written per request (a hot-row UPDATE on every call); it is
        read from the append-only ledger: per key, the newest row of the account since the
        key's creation, walking the (account_id, occurred_at) index backwards, one LIMIT 1
        probe per key of the page. A value kept in `api_keys.last_used_at` (if a writer
        maintains it) wins when it is later.
        """
        statement = (
            select(ApiKey, func.greatest(ApiKey.last_used_at, self._last_used_subquery()))
            .where(ApiKey.account_id == account_id)
            .order_by(ApiKey.created_at, ApiKey.id)
            .limit(limit + 1)
        )
        if after is not None:
            statement = statement.where(tuple_(ApiKey.created_at, ApiKey.id) > tuple_(*after))
        rows = await self.session.execute(statement)
        return [(key, used) for key, used in rows]

    async def update_key(self, key: ApiKey, changes: dict[str, Any]) -> ApiKey:
        """Change the key and tell every proxy to reload its directory when (and only if)
        this commits. The payload is not a key id: an id would read as a revocation."""
        for field, value in changes.items():
            setattr(key, field, value)
        await self.session.flush()
        await notify(self.session, Channel.KEYS, KEY_CHANGED)
        await self.session.refresh(key)
        return key

    async def revoke_key(self, key: ApiKey) -> ApiKey:
        """Revoke once (a second call keeps the first time) and tell every proxy at once.

        NOTIFY is transactional: the proxies hear it when, and only if, the revocation
        commits, so no proxy drops a key that is still valid, or keeps one that is not.
        """
        await self.session.execute(
            update(ApiKey)
            .where(ApiKey.id == key.id, ApiKey.revoked_at.is_(None))
            .values(revoked_at=func.now())
        )
        await notify(self.session, Channel.KEYS, str(key.id))
        await self.session.refresh(key)
        return key
