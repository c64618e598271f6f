"""Usage that did not pass through the proxy (batch jobs, another gateway), taken in as
CloudEvents: priced like proxied rows by the version in force at each event's time, stored
once per (`source`, `id`) whatever is sent again."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
from pydantic import TypeAdapter, ValidationError
from sqlalchemy.ext.asyncio import AsyncSession

from pricing.cost import TokenUsage
from pricing.rate_cards import Tariff
from service.errors import MeterlineError, Unprocessable
from service.events.repository import EventRepository
from service.events.schemas import Ingested, UsageCloudEvent
from service.ledger.record import LedgerRecord, UsageSource, new_request_id
from service.tariff.service import load_tariff

SINGLE = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
MAX_BATCH = 10_000

_EVENTS = TypeAdapter(list[UsageCloudEvent])


class UnsupportedMediaType(MeterlineError):
    status_code = 415
    code = "unsupported_media_type"
    description = (
        "The body must be `application/cloudevents+json` (one event) or "
        "`application/cloudevents-batch+json` (a list); `application/json` takes either."
    )


def parse_events(content_type: str, raw: bytes) -> list[UsageCloudEvent]:
    """The events of a body; a 422 names the event (index and id) and the field."""
    media = content_type.partition(";")[0].strip().lower()
    if media not in (SINGLE, BATCH, "application/json"):
        raise UnsupportedMediaType(f"content type {media or 'none'!r} is not a CloudEvents one")
    try:
        body: Any = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise Unprocessable("body: not JSON", param="body") from None
    batch = isinstance(body, list)
    if media == BATCH and not batch:
        raise Unprocessable("body: a batch is a JSON list of events", param="body")
    if media == SINGLE and batch:
        raise Unprocessable(f"body: one event is an object (a list is {BATCH})", param="body")
    events = body if batch else [body]
    if len(events) > MAX_BATCH:
        raise Unprocessable(f"body: at most {MAX_BATCH} events per request", param="body")
    try:
        return _EVENTS.validate_python(events)
    except ValidationError as invalid:
        error = invalid.errors()[0]
        index, *field = error["loc"]
        where = ".".join(str(part) for part in ["body", *([index] if batch else []), *field])
        event = events[int(index)]
        named = event.get("id") if isinstance(event, dict) else None
        raise Unprocessable(
            f"{where}: {error['msg']} (event {index}, id {named!r})", param=where
        ) from None


async def ingest(session: AsyncSession, events: list[UsageCloudEvent]) -> Ingested:
    repository = EventRepository(session)
    unique = {(event.source, event.id): event for event in reversed(events)}  # first wins
    await _check_owners(repository, events)
    now = datetime.now(UTC)
    identities = {key: (new_request_id(), event.time or now) for key, event in unique.items()}
    new = await repository.claim(
        [(source, id_, request_id, at) for (source, id_), (request_id, at) in identities.items()]
    )
    tariff = await load_tariff(session)
    records = [_record(unique[key], *identities[key], tariff) for key in unique if key in new]
    await repository.store(records)
    return Ingested(accepted=len(records), duplicates=len(events) - len(records))


async def _check_owners(repository: EventRepository, events: list[UsageCloudEvent]) -> None:
    accounts = await repository.existing_accounts(event.subject for event in events)
    keys = await repository.key_accounts(e.data.key_id for e in events if e.data.key_id)
    for index, event in enumerate(events):
        if event.subject not in accounts:
            raise Unprocessable(
                f"body.{index}.subject: no account {event.subject} (event id {event.id!r})",
                param=f"body.{index}.subject",
            )
        if event.data.key_id is not None and keys.get(event.data.key_id) != event.subject:
            raise Unprocessable(
                f"body.{index}.data.key_id: not a key of account {event.subject}"
                f" (event id {event.id!r})",
                param=f"body.{index}.data.key_id",
            )


def _record(event: UsageCloudEvent, request_id: str, at: datetime, tariff: Tariff) -> LedgerRecord:
    data = event.data
    # The event's source stands for the provider: its provider costs apply when it names one.
    provider = event.source[:64]
    usage = TokenUsage(data.prompt_tokens, data.completion_tokens, data.cached_tokens)
    charge = tariff.charge(event.subject, data.model, at, provider, usage)
    return LedgerRecord(
        request_id=request_id,
        occurred_at=at,
        account_id=event.subject,
        key_id=data.key_id,
        task_id=data.task_id,
        task_type=data.task_type,
        endpoint=data.endpoint,
        requested_model=data.model,
        upstream_model=None,
        provider=provider,
        stream=False,
        status_code=200,
        error_code=None,
        prompt_tokens=data.prompt_tokens,
        completion_tokens=data.completion_tokens,
        total_tokens=data.prompt_tokens + data.completion_tokens,
        cached_tokens=data.cached_tokens,
        reasoning_tokens=data.reasoning_tokens,
        usage_source=UsageSource.UPSTREAM,
        latency_ms=None,  # not measured here
        ttft_ms=None,
        cost_usd=charge.cost_usd,
        price_version_id=charge.price_version_id,
        usage_flag=None,
        provider_cost_usd=charge.provider_cost_usd,
        provider_cost_version_id=charge.provider_cost_version_id,
        rate_card_version_id=charge.rate_card_version_id,
    )
