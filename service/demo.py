"""What `meterline serve --demo` sets up, and keeps in the data directory for its restarts.

The demo's admin token, account and key live in `demo.env` (mode 0600): a restart reuses
them, so a key pasted into a script keeps working and no second "Demo" account appears.
The file is written as shell `export` lines, so the README's examples can source it.
"""

from __future__ import annotations

import os
import secrets
import shlex
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from pricing.prices import BEGINNING_OF_TIME, Price, PriceBook
from service.accounts.repository import AccountRepository
from service.accounts.schemas import AccountCreate
from service.accounts.service import create_account, create_key
from service.auth.keys import hash_key
from service.auth.repository import key_with_hash
from service.auth.usability import key_usable
from service.db.engine import create_engine, session_factory, transaction
from service.prices.cache import seed_default_prices
from service.prices.repository import PriceRepository

DEMO_FILE = "demo.env"
# The mock provider's models, priced so that the Quick start shows a cost. Only where no
# price covers them: a price the operator added wins.
DEMO_PRICES = {
    "mock-chat": (Decimal("0.50"), Decimal("1.50")),
    "mock-base": (Decimal("0.50"), Decimal("1.50")),
    "mock-embed": (Decimal("0.10"), Decimal("0.10")),
}


@dataclass(frozen=True)
class DemoIdentity:
    """Who the demo's examples speak as: its admin token and its account's key."""

    admin_token: str
    account_id: uuid.UUID
    key: str


def demo_file(data_dir: Path) -> Path:
    return data_dir / DEMO_FILE


def read_demo_file(data_dir: Path) -> dict[str, str]:
    """The variables a previous demo wrote; none when there is no (readable) file."""
    try:
        text = demo_file(data_dir).read_text()
    except OSError:
        return {}
    variables = {}
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        if len(words) == 2 and words[0] == "export" and "=" in words[1]:
            name, value = words[1].split("=", 1)
            variables[name] = value
    return variables


def write_demo_file(data_dir: Path, url: str, identity: DemoIdentity, admin_from_env: bool) -> Path:
    """Write the demo's variables, readable by its owner only, replacing the file at once."""
    variables = {
        "ML": url,
        "METERLINE_URL": url,
        "KEY": identity.key,
        "ACCOUNT_ID": str(identity.account_id),
    }
    # An admin token the operator set stays where they keep it; the file would otherwise
    # override it with a stale one in every shell that sources it.
    if not admin_from_env:
        variables["METERLINE_ADMIN_TOKEN"] = identity.admin_token
    lines = ["# meterline serve --demo: reused on restart; `. this-file` for the README."]
    lines += [f"export {name}={shlex.quote(value)}" for name, value in variables.items()]
    path = demo_file(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{DEMO_FILE}.{os.getpid()}")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write("\n".join(lines) + "\n")
    os.replace(partial, path)
    return path


async def _usable_stored_key(session: AsyncSession, account_id: uuid.UUID, key: str) -> bool:
    stored = await key_with_hash(session, hash_key(key))
    return (
        stored is not None
        and stored.account_id == account_id
        and key_usable(stored.revoked_at, stored.expires_at, datetime.now(UTC))
    )


async def _demo_account(session: AsyncSession, stored: dict[str, str]) -> tuple[uuid.UUID, str]:
    """The stored account and key while the database still has them, else new ones."""
    try:
        account_id: uuid.UUID | None = uuid.UUID(stored.get("ACCOUNT_ID", ""))
    except ValueError:
        account_id = None
    if account_id is None or await AccountRepository(session).get_account(account_id) is None:
        account_id = (await create_account(session, AccountCreate(name="Demo"))).id
    key = stored.get("KEY", "")
    if not key or not await _usable_stored_key(session, account_id, key):
        key = (await create_key(session, account_id, name="demo")).key
    return account_id, key


async def _price_demo_models(sessions: async_sessionmaker[AsyncSession]) -> None:
    # The shipped list first: it is loaded only into an empty price table.
    await seed_default_prices(sessions)
    async with transaction(sessions) as session:
        repository = PriceRepository(session)
        book = PriceBook(await repository.all_prices())
        now = datetime.now(UTC)
        missing = [
            Price(model, input_rate, output_rate, BEGINNING_OF_TIME)
            for model, (input_rate, output_rate) in DEMO_PRICES.items()
            if book.price_for(model, now) is None
        ]
        await repository.insert_missing(missing, source="demo")


async def prepare_demo(database_url: str, data_dir: Path, admin_token: str | None) -> DemoIdentity:
    """The demo's identity (the stored one where still valid) and its models' prices."""
    stored = read_demo_file(data_dir)
    token = admin_token or stored.get("METERLINE_ADMIN_TOKEN") or "mla-" + secrets.token_urlsafe(24)
    engine = create_engine(database_url, pool_size=1)
    try:
        sessions = session_factory(engine)
        async with transaction(sessions) as session:
            account_id, key = await _demo_account(session, stored)
        await _price_demo_models(sessions)
    finally:
        await engine.dispose()
    return DemoIdentity(token, account_id, key)
