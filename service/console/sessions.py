"""Signing in to the console, and who a request's session cookie is.

A session is a random token in an HttpOnly, SameSite=Strict cookie; only its SHA-256 is
stored, beside the CSRF token every form of that session must send back. Who a credential
is comes from `service.auth.principal.principal_for`, the billing API's own check, so a
signed-in browser can do exactly what its credential can do through the API. The session
is checked against its credential on every request: a revoked or expired key, or a rotated
admin token, ends it at once.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncSession

from service.auth.principal import ADMIN, Principal, principal_for
from service.auth.usability import key_usable
from service.console.repository import ConsoleSessionRepository

COOKIE = "meterline_console"
# The sign-in form's own CSRF token (double-submit: cookie and form field must match).
SIGN_IN_COOKIE = "meterline_console_sign_in"


@dataclass(frozen=True, slots=True)
class SignedIn:
    principal: Principal
    csrf_token: str
    token_hash: bytes


@dataclass(frozen=True, slots=True)
class NewSession:
    token: str  # the cookie's value: never stored
    signed_in: SignedIn
    expires_at: datetime


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()


def _admin_hash(admin_token: SecretStr | None) -> bytes | None:
    return _digest(admin_token.get_secret_value()) if admin_token is not None else None


async def sign_in(
    session: AsyncSession, credential: str, admin_token: SecretStr | None, ttl_s: int
) -> NewSession:
    """A new session for a valid credential; any invalid one is the same 401."""
    principal = await principal_for(session, credential.strip(), admin_token)
    repository = ConsoleSessionRepository(session)
    now = datetime.now(UTC)
    await repository.remove_expired(now)
    token = secrets.token_urlsafe(32)
    signed_in = SignedIn(principal, secrets.token_urlsafe(32), _digest(token))
    expires_at = now + timedelta(seconds=ttl_s)
    await repository.add(
        signed_in.token_hash,
        signed_in.csrf_token,
        expires_at,
        principal.key_id,
        _admin_hash(admin_token) if principal.is_admin else None,
    )
    return NewSession(token, signed_in, expires_at)


async def resolve(
    session: AsyncSession, token: str | None, admin_token: SecretStr | None
) -> SignedIn | None:
    """Who the cookie's session is, or None when it has ended for any reason."""
    if not token:
        return None
    token_hash = _digest(token)
    now = datetime.now(UTC)
    found = await ConsoleSessionRepository(session).find(token_hash, now)
    if found is None:
        return None
    stored, key = found
    if stored.key_id is None:
        current = _admin_hash(admin_token)
        if current is None or stored.admin_token_hash is None:
            return None
        if not hmac.compare_digest(current, stored.admin_token_hash):
            return None
        return SignedIn(ADMIN, stored.csrf_token, token_hash)
    if key is None or not key_usable(key.revoked_at, key.expires_at, now):
        return None
    return SignedIn(Principal(key.account_id, key.id), stored.csrf_token, token_hash)


async def sign_out(session: AsyncSession, signed_in: SignedIn) -> None:
    await ConsoleSessionRepository(session).remove(signed_in.token_hash)


def new_form_token() -> str:
    return secrets.token_urlsafe(32)


def csrf_matches(expected: str, presented: str | None) -> bool:
    return presented is not None and hmac.compare_digest(expected.encode(), presented.encode())
