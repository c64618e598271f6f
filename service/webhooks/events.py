"""The business events Meterline sends as webhooks: their types, and the body each is sent as.

A body is `{"type", "timestamp", "data"}`, the shape the Standard Webhooks specification
suggests; `data` of each type is documented in the README ("Webhooks"). The event's id is
not in the body: it is the `webhook-id` header, the same on every attempt.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import orjson


class EventType(StrEnum):
    INVOICE_FINALIZED = "invoice.finalized"
    INVOICE_VOIDED = "invoice.voided"
    CREDIT_NOTE_CREATED = "credit_note.created"
    CREDITS_LOW = "credits.low"
    CREDITS_DEPLETED = "credits.depleted"
    BUDGET_THRESHOLD = "budget.threshold"
    TASK_COMPLETED = "task.completed"
    TASK_COST_CAP_REACHED = "task.cost_cap_reached"
    ACCOUNT_TIER_CHANGED = "account.tier_changed"


# What each type says happened, for the API's documentation.
DESCRIPTIONS: dict[EventType, str] = {
    EventType.INVOICE_FINALIZED: "An invoice was finalized (numbered, frozen).",
    EventType.INVOICE_VOIDED: "A finalized invoice was voided.",
    EventType.CREDIT_NOTE_CREATED: "A credit note was issued against an invoice.",
    EventType.CREDITS_LOW: (
        "A prepaid account's balance fell below its low-balance threshold (once a grant)."
    ),
    EventType.CREDITS_DEPLETED: "A prepaid account's balance reached zero (once a grant).",
    EventType.BUDGET_THRESHOLD: "A monthly budget reached 80 % or 100 % (once each a month).",
    EventType.TASK_COMPLETED: "A task's outcome was recorded.",
    EventType.TASK_COST_CAP_REACHED: "A quoted task's cost reached its cap (once a task).",
    EventType.ACCOUNT_TIER_CHANGED: "An account moved to another tier.",
}


def event_ref(event_id: uuid.UUID) -> str:
    """The id an event is known by outside: `webhook-id`, the API's `event_id`."""
    return f"evt_{event_id.hex}"


def event_body(type_: EventType, data: dict[str, Any], at: datetime | None = None) -> str:
    """The JSON sent for an event: its bytes are stored, so every attempt sends the same."""
    timestamp = (at or datetime.now(UTC)).astimezone(UTC).isoformat().replace("+00:00", "Z")
    return orjson.dumps({"type": type_.value, "timestamp": timestamp, "data": data}).decode()
