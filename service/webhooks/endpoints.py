"""`/billing/webhooks`: endpoints that receive signed webhooks, and their deliveries (admin)."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Response, status

from service.deps import Admin, Config, Session
from service.errors import API_ERRORS, errors
from service.schemas import CursorParam, Limit, Page, links
from service.webhooks import service
from service.webhooks.schemas import (
    DeliveryOut,
    WebhookCreate,
    WebhookCreated,
    WebhookOut,
    WebhookUpdate,
)

router = APIRouter(prefix="/billing/webhooks", tags=["webhooks"], responses=errors(*API_ERRORS))

UNSAFE_URL = errors(*API_ERRORS, service.UnsafeWebhookUrl)


WEBHOOK = {"path.webhook_id": "$response.body#/id"}


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=WebhookCreated,
    responses={
        **UNSAFE_URL,
        201: links(
            GetWebhook=("GET", "/billing/webhooks/{webhook_id}", WEBHOOK),
            UpdateWebhook=("PATCH", "/billing/webhooks/{webhook_id}", WEBHOOK),
            DeleteWebhook=("DELETE", "/billing/webhooks/{webhook_id}", WEBHOOK),
            ListDeliveries=("GET", "/billing/webhooks/{webhook_id}/deliveries", WEBHOOK),
        ),
    },
)
async def create_webhook(
    data: WebhookCreate, session: Session, settings: Config, _: Admin
) -> WebhookCreated:
    """Subscribe a URL to event types (admin). The response is the only time the signing
    secret is shown: receivers verify each delivery with it (Standard Webhooks)."""
    return await service.create_endpoint(session, data, settings.webhooks_allow_private)


@router.get("", response_model=Page[WebhookOut])
async def list_webhooks(
    session: Session, _: Admin, limit: Limit = 50, cursor: CursorParam = None
) -> Page[WebhookOut]:
    """Every endpoint, oldest first (never its secret)."""
    return await service.list_endpoints(session, limit, cursor)


@router.get("/{webhook_id}", response_model=WebhookOut)
async def get_webhook(webhook_id: uuid.UUID, session: Session, _: Admin) -> WebhookOut:
    return WebhookOut.model_validate(await service.get_endpoint(session, webhook_id))


@router.patch("/{webhook_id}", response_model=WebhookOut, responses=UNSAFE_URL)
async def update_webhook(
    webhook_id: uuid.UUID, data: WebhookUpdate, session: Session, settings: Config, _: Admin
) -> WebhookOut:
    """Change the fields sent: URL, event types, description, enabled. Events raised from
    now on follow the new subscription; deliveries already made keep going to the endpoint."""
    return await service.update_endpoint(session, webhook_id, data, settings.webhooks_allow_private)


@router.delete("/{webhook_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_webhook(webhook_id: uuid.UUID, session: Session, _: Admin) -> Response:
    """Delete the endpoint and its deliveries; nothing more is sent to it."""
    await service.delete_endpoint(session, webhook_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/{webhook_id}/deliveries", response_model=Page[DeliveryOut])
async def list_deliveries(
    webhook_id: uuid.UUID,
    session: Session,
    _: Admin,
    limit: Limit = 50,
    cursor: CursorParam = None,
) -> Page[DeliveryOut]:
    """The endpoint's deliveries, newest first: status, attempts, last error, next attempt."""
    return await service.list_deliveries(session, webhook_id, limit, cursor)


@router.post("/{webhook_id}/deliveries/{delivery_id}/retry", response_model=DeliveryOut)
async def retry_delivery(
    webhook_id: uuid.UUID, delivery_id: uuid.UUID, session: Session, _: Admin
) -> DeliveryOut:
    """Attempt the delivery again now, with the same event id and body."""
    return await service.retry_delivery(session, webhook_id, delivery_id)
