"""Every NOTIFY channel Meterline sends on, and the one way to send on it.

A notification is sent inside the transaction that made the change, so it is delivered
when, and only if, that transaction commits; every worker hears it through its one
listening connection (service/db/listener.py).
"""

from __future__ import annotations

from enum import StrEnum

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession


class Channel(StrEnum):
    # A key was revoked; the payload is its id. The key directory drops it at once. Any
    # other payload (`KEY_CHANGED`) says a key's settings changed: the directory reloads.
    KEYS = "meterline_keys"
    # A task opened or closed; the payload is JSON (service/tasks/expiry.py, service.py).
    # The task guard applies it at once.
    TASKS = "meterline_tasks"
    # An account's credit grants changed; the payload is its id. The proxy reads that
    # account's credit from the ledger again before its next request.
    CREDITS = "meterline_credits"
    # A webhook delivery became due (service/webhooks/outbox.py); no payload. The sender
    # wakes at once instead of at its next round.
    WEBHOOKS = "meterline_webhooks"


KEY_CHANGED = "changed"

_NOTIFY = text("SELECT pg_notify(:channel, :payload)")


async def notify(session: AsyncSession, channel: Channel, payload: str) -> None:
    """Tell every Meterline process, when this session's transaction commits."""
    await session.execute(_NOTIFY, {"channel": channel.value, "payload": payload})
