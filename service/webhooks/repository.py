"""Every query of webhooks: endpoints, the outbox and its fan-out, and the sender's claims."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select, text, tuple_, update

from service.db.models import DeliveryStatus, WebhookDelivery, WebhookEndpoint, WebhookEvent
from service.db.repository import Repository

# The event, and one delivery to each enabled endpoint subscribed to its type, in one
# statement of the caller's transaction. An event with a `dedup_key` already raised is
# neither stored nor fanned out again.
_RAISE = text(
    """
WITH event AS (
    INSERT INTO webhook_events (type, account_id, body, dedup_key)
    VALUES (:type, :account_id, :body, :dedup_key)
    ON CONFLICT (dedup_key) DO NOTHING
    RETURNING id
), fanned AS (
    INSERT INTO webhook_deliveries (event_id, endpoint_id)
    SELECT event.id, w.id FROM event JOIN webhook_endpoints w
        ON w.enabled AND CAST(:type AS varchar) = ANY(w.events)
    RETURNING 1
)
SELECT (SELECT id FROM event) AS event_id, (SELECT count(*) FROM fanned) AS deliveries
"""
)

# Due deliveries of enabled endpoints, claimed by pushing their next attempt past this
# attempt's deadline; rows another sender holds are skipped, not waited for.
_CLAIM = text(
    """
WITH due AS (
    SELECT d.id FROM webhook_deliveries d
    JOIN webhook_endpoints w ON w.id = d.endpoint_id AND w.enabled
    WHERE d.status = 'pending' AND d.next_attempt_at <= now()
    ORDER BY d.next_attempt_at
    LIMIT :limit
    FOR UPDATE OF d SKIP LOCKED
)
UPDATE webhook_deliveries d
SET attempts = d.attempts + 1,
    last_attempt_at = now(),
    next_attempt_at = now() + make_interval(secs => :lease_s)
FROM due, webhook_events e, webhook_endpoints w
WHERE d.id = due.id AND e.id = d.event_id AND w.id = d.endpoint_id
RETURNING d.id, d.attempts, e.id AS event_id, e.body, e.created_at AS raised_at, w.url, w.secret
"""
)

# A failed attempt: due again after `delay_s`, or given up once that falls past the window.
_FAILED = text(
    """
UPDATE webhook_deliveries d
SET last_error = :error, last_status_code = :status_code,
    status = CASE WHEN now() + make_interval(secs => :delay_s)
                       > e.created_at + make_interval(secs => :window_s)
                  THEN 'failed' ELSE 'pending' END,
    next_attempt_at = now() + make_interval(secs => :delay_s)
FROM webhook_events e
WHERE d.id = :id AND e.id = d.event_id AND d.status = 'pending'
"""
)


@dataclass(frozen=True, slots=True)
class ClaimedDelivery:
    id: uuid.UUID
    attempts: int  # this one included
    event_id: uuid.UUID
    body: str
    raised_at: datetime
    url: str
    secret: str


class WebhookRepository(Repository):
    # -- endpoints ----------------------------------------------------------------

    async def add_endpoint(self, endpoint: WebhookEndpoint) -> WebhookEndpoint:
        self.session.add(endpoint)
        await self.session.flush()
        await self.session.refresh(endpoint)
        return endpoint

    async def get_endpoint(self, endpoint_id: uuid.UUID) -> WebhookEndpoint | None:
        return await self.session.get(WebhookEndpoint, endpoint_id)

    async def list_endpoints(
        self, limit: int, after: tuple[datetime, uuid.UUID] | None
    ) -> Sequence[WebhookEndpoint]:
        """Oldest first, keyset-paginated on (created_at, id); `limit + 1` rows."""
        statement = (
            select(WebhookEndpoint)
            .order_by(WebhookEndpoint.created_at, WebhookEndpoint.id)
            .limit(limit + 1)
        )
        if after is not None:
            key = tuple_(WebhookEndpoint.created_at, WebhookEndpoint.id)
            statement = statement.where(key > tuple_(*after))
        return (await self.session.scalars(statement)).all()

    async def update_endpoint(
        self, endpoint: WebhookEndpoint, changes: dict[str, Any]
    ) -> WebhookEndpoint:
        for name, value in changes.items():
            setattr(endpoint, name, value)
        await self.session.flush()
        await self.session.refresh(endpoint)  # `updated_at` is the database's
        return endpoint

    async def delete_endpoint(self, endpoint_id: uuid.UUID) -> bool:
        """Delete an endpoint and its deliveries; False when there was none."""
        result = await self.session.execute(
            delete(WebhookEndpoint)
            .where(WebhookEndpoint.id == endpoint_id)
            .returning(WebhookEndpoint.id)
        )
        return result.first() is not None

    # -- the outbox ---------------------------------------------------------------

    async def raise_event(
        self, type_: str, account_id: uuid.UUID | None, body: str, dedup_key: str | None
    ) -> tuple[uuid.UUID | None, int]:
        """Store the event and its deliveries: (its id, how many), or (None, 0) when its
        `dedup_key` was raised before."""
        params = {"type": type_, "account_id": account_id, "body": body, "dedup_key": dedup_key}
        row = (await self.session.execute(_RAISE, params)).one()
        return row.event_id, int(row.deliveries)

    async def get_event(self, event_id: uuid.UUID) -> WebhookEvent | None:
        return await self.session.get(WebhookEvent, event_id)

    # -- deliveries ---------------------------------------------------------------

    async def list_deliveries(
        self, endpoint_id: uuid.UUID, limit: int, before: tuple[datetime, uuid.UUID] | None
    ) -> Sequence[tuple[WebhookDelivery, str]]:
        """An endpoint's deliveries with their event's type, newest first; `limit + 1` rows."""
        statement = (
            select(WebhookDelivery, WebhookEvent.type)
            .join(WebhookEvent, WebhookEvent.id == WebhookDelivery.event_id)
            .where(WebhookDelivery.endpoint_id == endpoint_id)
            .order_by(WebhookDelivery.created_at.desc(), WebhookDelivery.id.desc())
            .limit(limit + 1)
        )
        if before is not None:
            key = tuple_(WebhookDelivery.created_at, WebhookDelivery.id)
            statement = statement.where(key < tuple_(*before))
        return [(d, t) for d, t in await self.session.execute(statement)]

    async def get_delivery(
        self, endpoint_id: uuid.UUID, delivery_id: uuid.UUID
    ) -> tuple[WebhookDelivery, str] | None:
        statement = (
            select(WebhookDelivery, WebhookEvent.type)
            .join(WebhookEvent, WebhookEvent.id == WebhookDelivery.event_id)
            .where(WebhookDelivery.id == delivery_id, WebhookDelivery.endpoint_id == endpoint_id)
        )
        row = (await self.session.execute(statement)).first()
        return None if row is None else (row[0], row[1])

    async def retry_now(self, delivery_id: uuid.UUID) -> None:
        """Make a delivery due at once, whatever its state (a delivered one is sent again)."""
        await self.session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == delivery_id)
            .values(status=DeliveryStatus.PENDING, next_attempt_at=func.now())
            .execution_options(synchronize_session=False)
        )

    # -- the sender ---------------------------------------------------------------

    async def claim(self, limit: int, lease_s: float) -> list[ClaimedDelivery]:
        rows = await self.session.execute(_CLAIM, {"limit": limit, "lease_s": lease_s})
        return [ClaimedDelivery(*row) for row in rows]

    async def delivered(self, delivery_id: uuid.UUID, status_code: int) -> None:
        await self.session.execute(
            update(WebhookDelivery)
            .where(
                WebhookDelivery.id == delivery_id,
                WebhookDelivery.status == DeliveryStatus.PENDING,
            )
            .values(
                status=DeliveryStatus.DELIVERED,
                delivered_at=func.now(),
                last_status_code=status_code,
                last_error=None,
            )
            .execution_options(synchronize_session=False)
        )

    async def failed(
        self,
        delivery_id: uuid.UUID,
        error: str,
        status_code: int | None,
        delay_s: float,
        window_s: float,
    ) -> None:
        await self.session.execute(
            _FAILED,
            {
                "id": delivery_id,
                "error": error[:500],
                "status_code": status_code,
                "delay_s": delay_s,
                "window_s": window_s,
            },
        )
