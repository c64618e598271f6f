"""The one way to raise a business event: inside the transaction of the change that caused it.

`raise_event` writes the event to the outbox and one delivery row for each enabled endpoint
subscribed to its type, in the caller's session: the event exists if and only if the change
commits (an invoice finalized, a task completed, credits granted…), and the background
sender (service/webhooks/sender.py) is woken by a NOTIFY sent in the same transaction.
Every service calls it; none ever sends anything itself.

An event that must happen once whoever raises it (a budget's 80 % of a month, raised by
whichever process saw it first) passes a `dedup_key`: raised again, it is not stored again.
"""

from __future__ import annotations

import logging
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from service.db.channels import Channel, notify
from service.webhooks.events import EventType, event_body, event_ref
from service.webhooks.repository import WebhookRepository

log = logging.getLogger("meterline.webhooks")


async def raise_event(
    session: AsyncSession,
    type_: EventType,
    data: dict[str, Any],
    account_id: uuid.UUID | None,
    *,
    dedup_key: str | None = None,
    at: datetime | None = None,
) -> str | None:
    """Record the event `type_` with `data` (JSON-ready: money as decimal strings) in this
    session's transaction; its id (`evt_…`), or None when `dedup_key` was raised before."""
    body = event_body(type_, data, at)
    event_id, deliveries = await WebhookRepository(session).raise_event(
        type_.value, account_id, body, dedup_key
    )
    if event_id is None:
        return None
    if deliveries:
        await notify(session, Channel.WEBHOOKS, "")
    log.info(
        "event=webhook_event_raised type=%s event_id=%s deliveries=%d",
        type_.value,
        event_ref(event_id),
        deliveries,
    )
    return event_ref(event_id)
