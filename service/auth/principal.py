"""Who is calling the billing API: the admin, or a customer key scoped to its account."""

from __future__ import annotations

import hmac
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from fastapi import Request
from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncSession

from service.auth import repository
from service.auth.keys import hash_key
from service.auth.usability import key_usable
from service.errors import ConflictingCredentials, NotFound, Unauthorized


@dataclass(frozen=True, slots=True)
class Principal:
    account_id: uuid.UUID | None  # None for the admin
    key_id: uuid.UUID | None

    @property
    def is_admin(self) -> bool:
        return self.account_id is None

    def require_account(self, account_id: uuid.UUID, missing: NotFound | None = None) -> None:
        """A customer sees only its own account; anything else does not exist for it.

        Pass the very error raised for a missing object as `missing`, so a customer cannot tell
        another account's object from one that does not exist.
        """
        if not self.is_admin and account_id != self.account_id:
            raise missing or NotFound("not found")

    def scope(self, account_id: uuid.UUID | None) -> uuid.UUID | None:
        """The account a query is limited to: the caller's own, or the admin's choice."""
        if self.is_admin:
            return account_id
        self.require_account(account_id or self.account_id)  # type: ignore[arg-type]
        return self.account_id


ADMIN = Principal(account_id=None, key_id=None)


def presented_credential(request: Request) -> str | None:
    """The token from `Authorization: Bearer …` or `X-API-Key`; both and different is a 400."""
    bearer = None
    authorization = request.headers.get("authorization")
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise Unauthorized("Authorization header must be 'Bearer <key>'")
        bearer = value.strip()
    # An empty or blank header is no credential (never one that matches an empty token).
    header_key = request.headers.get("x-api-key", "").strip() or None
    # Bytes: compare_digest refuses str with non-ASCII characters (a header may carry any).
    if bearer and header_key and not hmac.compare_digest(bearer.encode(), header_key.encode()):
        raise ConflictingCredentials("Authorization and X-API-Key carry different keys; send one")
    return bearer or header_key


def is_admin_token(token: str, admin_token: SecretStr | None) -> bool:
    # Bytes: compare_digest refuses str with non-ASCII characters.
    return admin_token is not None and hmac.compare_digest(
        token.encode(), admin_token.get_secret_value().encode()
    )


async def principal_for(
    session: AsyncSession, token: str, admin_token: SecretStr | None
) -> Principal:
    """Who a credential is: the admin token, or a usable customer key (else a 401).

    The billing API and the console's sign-in both ask here, so they can never disagree on
    who may see what.
    """
    if is_admin_token(token, admin_token):
        return ADMIN
    key = await repository.key_with_hash(session, hash_key(token))
    if key is None or not key_usable(key.revoked_at, key.expires_at, datetime.now(UTC)):
        raise Unauthorized("invalid, revoked or expired API key")
    return Principal(account_id=key.account_id, key_id=key.id)
