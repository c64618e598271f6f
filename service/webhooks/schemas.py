from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from service.db.models import DeliveryStatus, WebhookDelivery
from service.schemas import Text
from service.webhooks.events import EventType, event_ref

Url = Annotated[
    Text,
    Field(
        min_length=1,
        max_length=2048,
        description="http(s) URL; loopback and private addresses are refused.",
    ),
]
Events = Annotated[
    list[EventType],
    Field(min_length=1, max_length=len(EventType), description="The event types sent to it."),
]
Description = Annotated[Text, Field(max_length=500)]


def _distinct(events: list[EventType] | None) -> list[EventType] | None:
    return None if events is None else list(dict.fromkeys(events))


class WebhookCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: Url
    events: Events
    description: Description | None = None

    @field_validator("events")
    @classmethod
    def _each_event_once(cls, value: list[EventType] | None) -> list[EventType] | None:
        return _distinct(value)


# An endpoint always has these: a PATCH may leave them out, not set them to null.
NOT_NULLABLE = ("url", "events", "enabled")


def _drop_null(schema: dict[str, Any]) -> None:
    for name in NOT_NULLABLE:
        field = schema["properties"][name]
        options = [o for o in field.pop("anyOf", []) if o.get("type") != "null"]
        field.update(options[0] if len(options) == 1 else {"anyOf": options})
        field.pop("default", None)


class WebhookUpdate(BaseModel):
    """PATCH: only the fields sent change; `description: null` clears it."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_drop_null)

    url: Url | None = None
    events: Events | None = None
    description: Description | None = None
    enabled: bool | None = Field(default=None, description="A disabled endpoint gets nothing.")

    @field_validator("events")
    @classmethod
    def _each_event_once(cls, value: list[EventType] | None) -> list[EventType] | None:
        return _distinct(value)

    @field_validator(*NOT_NULLABLE, mode="before")
    @classmethod
    def _required_fields_cannot_be_cleared(cls, value: Any) -> Any:
        if value is None:
            raise ValueError("cannot be null")
        return value

    def changes(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.model_fields_set}


class WebhookOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    url: str
    events: list[EventType]
    description: str | None
    enabled: bool
    created_at: datetime
    updated_at: datetime


class WebhookCreated(WebhookOut):
    secret: str = Field(
        description="The signing secret (`whsec_` + base64, Standard Webhooks); shown only here."
    )


class DeliveryOut(BaseModel):
    id: uuid.UUID
    endpoint_id: uuid.UUID
    event_id: str = Field(description="The event's `webhook-id`, the same on every attempt.")
    event_type: EventType
    status: DeliveryStatus
    attempts: int
    last_status_code: int | None = Field(description="The endpoint's answer to the last attempt.")
    last_error: str | None
    last_attempt_at: datetime | None
    next_attempt_at: datetime | None = Field(description="When it is tried next (pending only).")
    delivered_at: datetime | None
    created_at: datetime

    @classmethod
    def of(cls, delivery: WebhookDelivery, event_type: str) -> DeliveryOut:
        pending = delivery.status == DeliveryStatus.PENDING
        return cls(
            id=delivery.id,
            endpoint_id=delivery.endpoint_id,
            event_id=event_ref(delivery.event_id),
            event_type=EventType(event_type),
            status=delivery.status,
            attempts=delivery.attempts,
            last_status_code=delivery.last_status_code,
            last_error=delivery.last_error,
            last_attempt_at=delivery.last_attempt_at,
            next_attempt_at=delivery.next_attempt_at if pending else None,
            delivered_at=delivery.delivered_at,
            created_at=delivery.created_at,
        )
