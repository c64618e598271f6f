"""Webhook endpoints (admin only): create with a secret shown once, list, change, delete;
their deliveries, and a retry on demand."""

from __future__ import annotations

import logging
import uuid
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession

from service.db.channels import Channel, notify
from service.db.models import WebhookEndpoint
from service.errors import NotFound, Unprocessable
from service.schemas import Page, decode_cursor, keyset_page
from service.webhooks import destinations
from service.webhooks.repository import WebhookRepository
from service.webhooks.schemas import (
    DeliveryOut,
    WebhookCreate,
    WebhookCreated,
    WebhookOut,
    WebhookUpdate,
)
from service.webhooks.signing import new_secret

log = logging.getLogger("meterline.webhooks")


class UnsafeWebhookUrl(Unprocessable):
    code = "unsafe_webhook_url"
    description = (
        "The URL is not http(s), does not resolve, or resolves to a loopback, private or"
        " reserved address (allowed only with `METERLINE_WEBHOOKS_ALLOW_PRIVATE`)."
    )


def _not_found(endpoint_id: uuid.UUID) -> NotFound:
    return NotFound(f"webhook endpoint {endpoint_id} not found", param="path.webhook_id")


async def _checked(url: str, allow_private: bool) -> str:
    try:
        await destinations.check(url, allow_private)
    except destinations.UnsafeDestination as exc:
        raise UnsafeWebhookUrl(str(exc), param="body.url") from exc
    return url


async def create_endpoint(
    session: AsyncSession, data: WebhookCreate, allow_private: bool
) -> WebhookCreated:
    endpoint = WebhookEndpoint(
        url=await _checked(data.url, allow_private),
        events=[e.value for e in data.events],
        description=data.description,
        secret=new_secret(),
    )
    endpoint = await WebhookRepository(session).add_endpoint(endpoint)
    log.info("event=webhook_endpoint_created webhook_id=%s", endpoint.id)
    return WebhookCreated.model_validate(endpoint)


async def get_endpoint(session: AsyncSession, endpoint_id: uuid.UUID) -> WebhookEndpoint:
    endpoint = await WebhookRepository(session).get_endpoint(endpoint_id)
    if endpoint is None:
        raise _not_found(endpoint_id)
    return endpoint


async def list_endpoints(session: AsyncSession, limit: int, cursor: str | None) -> Page[WebhookOut]:
    after = decode_cursor(cursor, datetime, uuid.UUID) if cursor else None
    rows = await WebhookRepository(session).list_endpoints(limit, after)
    return keyset_page(
        Page[WebhookOut],
        rows,
        limit,
        WebhookOut.model_validate,
        lambda e: (e.created_at.isoformat(), str(e.id)),
    )


async def update_endpoint(
    session: AsyncSession, endpoint_id: uuid.UUID, data: WebhookUpdate, allow_private: bool
) -> WebhookOut:
    endpoint = await get_endpoint(session, endpoint_id)
    changes = data.changes()
    if "url" in changes:
        changes["url"] = await _checked(changes["url"], allow_private)
    if "events" in changes:
        changes["events"] = [e.value for e in changes["events"]]
    endpoint = await WebhookRepository(session).update_endpoint(endpoint, changes)
    return WebhookOut.model_validate(endpoint)


async def delete_endpoint(session: AsyncSession, endpoint_id: uuid.UUID) -> None:
    """Delete an endpoint and its deliveries: nothing more is sent to it."""
    if not await WebhookRepository(session).delete_endpoint(endpoint_id):
        raise _not_found(endpoint_id)
    log.info("event=webhook_endpoint_deleted webhook_id=%s", endpoint_id)


async def list_deliveries(
    session: AsyncSession, endpoint_id: uuid.UUID, limit: int, cursor: str | None
) -> Page[DeliveryOut]:
    await get_endpoint(session, endpoint_id)
    before = decode_cursor(cursor, datetime, uuid.UUID) if cursor else None
    rows = await WebhookRepository(session).list_deliveries(endpoint_id, limit, before)
    return keyset_page(
        Page[DeliveryOut],
        rows,
        limit,
        lambda row: DeliveryOut.of(*row),
        lambda row: (row[0].created_at.isoformat(), str(row[0].id)),
    )


async def retry_delivery(
    session: AsyncSession, endpoint_id: uuid.UUID, delivery_id: uuid.UUID
) -> DeliveryOut:
    """Make a delivery due now (failed, pending or even delivered: it is sent again, with
    the same event id); its attempts go on counting."""
    repository = WebhookRepository(session)
    if await repository.get_delivery(endpoint_id, delivery_id) is None:
        raise NotFound(f"delivery {delivery_id} not found", param="path.delivery_id")
    await repository.retry_now(delivery_id)
    await notify(session, Channel.WEBHOOKS, "")  # the senders wake as this commits
    session.expire_all()
    found = await repository.get_delivery(endpoint_id, delivery_id)
    assert found is not None
    log.info("event=webhook_retry_requested delivery_id=%s", delivery_id)
    return DeliveryOut.of(*found)
