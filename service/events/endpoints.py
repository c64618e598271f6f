"""`POST /billing/events`: usage reported as CloudEvents, into the ledger."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from service.deps import Admin, Session
from service.errors import API_ERRORS, errors
from service.events import service
from service.events.schemas import EVENT_TYPE, Ingested, UsageCloudEvent

router = APIRouter(prefix="/billing/events", tags=["usage"], responses=errors(*API_ERRORS))

_EXAMPLE: dict[str, Any] = {
    "specversion": "1.0",
    "id": "job-7-step-1",
    "source": "batch-runner",
    "type": EVENT_TYPE,
    "subject": "0b3c8f3e-2a52-4a0e-9a36-5d1c6e1d2f00",
    "time": "2026-11-30T12:00:00Z",
    "data": {"model": "meta-llama/Llama-3.3-70B-Instruct", "prompt_tokens": 1200,
             "completion_tokens": 300},
}  # fmt: skip


@router.post(
    "",
    response_model=Ingested,
    responses=errors(*API_ERRORS, service.UnsupportedMediaType),
    openapi_extra={
        "requestBody": {
            "required": True,
            "description": (
                f"`{service.SINGLE}` (one event), `{service.BATCH}` (a list, at most"
                f" {service.MAX_BATCH}) or `application/json` (either)."
            ),
            "content": {
                "application/json": {
                    "schema": {
                        "anyOf": [
                            UsageCloudEvent.model_json_schema(),
                            {"type": "array", "items": UsageCloudEvent.model_json_schema()},
                        ]
                    },
                    "example": [_EXAMPLE],
                }
            },
        }
    },
)
async def ingest_events(request: Request, session: Session, admin: Admin) -> Ingested:
    """Usage that did not pass through the proxy, as CloudEvents of type `meterline.usage`
    whose `subject` is the account: each priced like a proxied row by the version in force
    at its `time`, stored once by (`source`, `id`) — the same batch sent again changes
    nothing. All or none: an invalid event (named by its index and id) refuses the batch."""
    events = service.parse_events(request.headers.get("content-type", ""), await request.body())
    return await service.ingest(session, events)
