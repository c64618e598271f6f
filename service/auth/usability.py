"""When a customer key may be used, defined once: the Python predicate for what is in memory
and the SQL condition for queries, side by side (tests/test_key_directory.py checks that
they agree).

A key is usable until it is revoked or its `expires_at` passes; an account has no state of
its own that stops its keys.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from sqlalchemy import ColumnElement, and_, func, or_

from service.db.models import ApiKey

KeyStatus = Literal["active", "revoked", "expired"]


def key_status(
    revoked_at: datetime | None, expires_at: datetime | None, now: datetime
) -> KeyStatus:
    if revoked_at is not None:
        return "revoked"
    if expires_at is not None and expires_at <= now:
        return "expired"
    return "active"


def key_usable(revoked_at: datetime | None, expires_at: datetime | None, now: datetime) -> bool:
    return key_status(revoked_at, expires_at, now) == "active"


def usable_key(now: datetime | None = None) -> ColumnElement[bool]:
    """`key_usable` of an `api_keys` row in SQL, at `now` (default: the transaction's time)."""
    at = func.now() if now is None else now
    return and_(
        ApiKey.revoked_at.is_(None), or_(ApiKey.expires_at.is_(None), ApiKey.expires_at > at)
    )
