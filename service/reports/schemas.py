from __future__ import annotations

import uuid
from typing import Literal

from pydantic import BaseModel, Field

from service.schemas import DecimalString

ReportFormat = Literal["csv", "json"]
InvoiceStatus = Literal["draft", "finalized", "void"]

# The CSV header, in order; the README documents each column.
COLUMNS = (
    "row_type",
    "period",
    "account_id",
    "account_name",
    "model",
    "task_type",
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "cost_usd",
    "unpriced_requests",
    "invoice_number",
    "invoice_status",
    "invoice_total_usd",
)


class ReportTotals(BaseModel):
    requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int
    reasoning_tokens: int
    cost_usd: DecimalString = Field(description="Exact, unrounded token cost.")
    unpriced_requests: int
    invoice_total_usd: DecimalString | None = Field(
        description="Sum of the invoices' totals, each account counted once."
    )


class ReportLine(ReportTotals):
    """One account and model (and task type, for the usage of quoted tasks)."""

    account_id: uuid.UUID
    account_name: str | None
    model: str
    task_type: str | None = Field(description="Set on the usage of quoted tasks only.")
    invoice_number: str | None = Field(description="Given when the invoice is finalized.")
    invoice_status: InvoiceStatus | None
    invoice_total_usd: DecimalString | None


class MonthlyReport(BaseModel):
    """The JSON form (streamed, one line per row of `data`)."""

    period: str = Field(examples=["2026-11"])
    data: list[ReportLine]
    totals: ReportTotals
