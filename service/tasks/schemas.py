from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from pricing.invoice import TaskBilling, TaskStatus
from service.schemas import DecimalString

# What a client reports: a TaskOutcome but `expired`, which only the deadline decides (as
# plain values, so a refusal names them as they are sent).
Outcome = Literal["succeeded", "failed"]


class TaskComplete(BaseModel):
    model_config = ConfigDict(extra="forbid")

    outcome: Outcome = Field(description="How the task ended; a task completes once.")


class TaskOut(BaseModel):
    """A task: its binding (quoted or not) and its usage, aggregated from the ledger."""

    id: str = Field(description="The `X-Task-Id` the requests carry; unique per account.")
    account_id: uuid.UUID
    task_type: str | None
    model: str | None = Field(
        description="The quoted model; for a task without quote, the model most requests used."
    )
    status: TaskStatus
    quoted: bool
    quote_id: uuid.UUID | None
    fixed_price_usd: DecimalString | None = Field(description="The accepted quote's price.")
    cost_cap_usd: DecimalString | None = Field(
        description="Actual cost at which a quoted task refuses further requests."
    )
    requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost_usd: DecimalString = Field(description="Exact actual cost of the task's requests.")
    unpriced_requests: int = Field(description="Requests with no price (not in `cost_usd`).")
    created_at: datetime = Field(description="For a quoted task, when its quote was accepted.")
    expires_at: datetime | None = Field(
        description="A quoted task still open then expires, billed by the account's"
        " `expired_task_policy`."
    )
    completed_at: datetime | None = Field(description="For an expired task, its deadline.")
    billed_as: TaskBilling | None = Field(
        description="How the completed quoted task is billed, fixed at completion."
    )
