from __future__ import annotations

import uuid
from datetime import date, datetime
from typing import Literal

from pydantic import BaseModel, Field

from service.ledger.record import UsageSource
from service.schemas import DecimalString

GroupBy = Literal[
    "day", "month", "account", "model", "key", "task", "task_type", "provider", "status"
]
GROUPS: tuple[GroupBy, ...] = (
    "day",
    "month",
    "account",
    "model",
    "key",
    "task",
    "task_type",
    "provider",
    "status",
)


# The field each group adds to a row.
GROUP_FIELDS: dict[GroupBy, str] = {
    "day": "day",
    "month": "month",
    "account": "account_id",
    "model": "model",
    "key": "key_id",
    "task": "task_id",
    "task_type": "task_type",
    "provider": "provider",
    "status": "status_code",
}


class UsageTotals(BaseModel):
    requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int
    reasoning_tokens: int
    cost_usd: DecimalString = Field(description="Exact, unrounded; unpriced rows add nothing.")
    unpriced_requests: int = Field(description="Rows no price covered (cost unknown).")


class UsageGroup(UsageTotals):
    """One group. Only the fields of the requested `group_by` dimensions are present."""

    day: date | None = Field(default=None, description="group_by=day (UTC).")
    month: str | None = Field(default=None, description="group_by=month, `YYYY-MM` (UTC).")
    account_id: uuid.UUID | None = Field(default=None, description="group_by=account.")
    model: str | None = Field(default=None, description="group_by=model: the model asked for.")
    key_id: uuid.UUID | None = Field(default=None, description="group_by=key.")
    task_id: str | None = Field(default=None, description="group_by=task (`X-Task-Id`).")
    task_type: str | None = Field(default=None, description="group_by=task_type.")
    provider: str | None = Field(default=None, description="group_by=provider.")
    status_code: int | None = Field(default=None, description="group_by=status (HTTP status).")


class UsageReport(BaseModel):
    data: list[UsageGroup]
    has_more: bool = Field(
        description="More groups exist than `limit`; narrow the range or the filters."
    )


class UsageEvent(BaseModel):
    """One ledger row, as recorded."""

    request_id: str
    occurred_at: datetime
    recorded_at: datetime
    kind: Literal["usage", "adjustment"]
    account_id: uuid.UUID
    key_id: uuid.UUID | None
    task_id: str | None
    task_type: str | None
    endpoint: str
    model: str = Field(description="The model asked for.")
    upstream_model: str | None
    provider: str | None
    stream: bool
    status_code: int
    error_code: str | None
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int
    reasoning_tokens: int
    usage_source: UsageSource
    latency_ms: int | None
    ttft_ms: int | None
    cost_usd: DecimalString | None = Field(description="Exact; null when unpriced.")
    price_version_id: int | None


# The fields of a raw row, in order: the columns of every export format.
EVENT_FIELDS: tuple[str, ...] = tuple(UsageEvent.model_fields)

ExportFormat = Literal["csv", "jsonl", "parquet"]
