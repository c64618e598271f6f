from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from pricing.invoice import InvoiceStatus
from service.schemas import DecimalString

ReportFormat = Literal["csv", "json"]

# A spreadsheet runs a cell starting with one of these as a formula (CSV injection), also
# behind the spaces and line feeds it skips (` =1+1`); a tab or CR first is escaped too.
# Every CSV export prefixes such a text cell with `'`: in Python (`reports.service.text_cell`)
# or in SQL (`reports.repository.text_cell_sql`), both from these two.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
SKIPPED_BEFORE_FORMULA = " \n"

# The CSV header, in order; the README documents each column.
COLUMNS = (
    "row_type",
    "period",
    "account_id",
    "account_name",
    "kind",
    "model",
    "task_type",
    "tasks",
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "cost_usd",
    "unpriced_requests",
    "billed_usd",
    "invoice_number",
    "invoice_status",
    "invoice_total_usd",
    "invoice_credited_usd",
    "invoice_amount_due_usd",
)


# A report line's kind (not an invoice line's: the report splits a task's usage from its price).
ReportLineKind = Literal["tokens", "adjustment", "task_usage", "task"]


class ReportTotals(BaseModel):
    tasks: int = Field(description="Quoted tasks completed in the month (task lines).")
    requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int
    reasoning_tokens: int
    cost_usd: DecimalString = Field(
        description="Exact, unrounded token cost; rows stored without a price are priced by"
        " the version in force at their time, if one exists now."
    )
    unpriced_requests: int = Field(description="Rows no price covers, even now.")
    billed_usd: DecimalString = Field(
        description="What the month's invoice bills for this line, exact and unrounded."
    )
    invoice_total_usd: DecimalString | None = Field(
        description="Sum of the invoices' totals, each account counted once."
    )
    invoice_credited_usd: DecimalString | None = Field(
        description="Sum of the credit notes against those invoices."
    )
    invoice_amount_due_usd: DecimalString | None = Field(
        description="Sum of what remains due on them: total less credit notes (void: 0)."
    )


class ReportLine(ReportTotals):
    """One account, kind and model (and task type, for quoted tasks and their usage)."""

    account_id: uuid.UUID
    account_name: str | None
    kind: ReportLineKind = Field(
        description="`tokens` and `adjustment`: usage billed per token; `task_usage`: usage"
        " quoted tasks cover (billed through them); `task`: quoted tasks completed in the month."
    )
    model: str = Field(description="The model asked for; a task line's quoted model.")
    task_type: str | None = Field(description="Set on quoted tasks and their usage only.")
    invoice_number: str | None = Field(description="Given when the invoice is finalized.")
    invoice_status: InvoiceStatus | None
    invoice_total_usd: DecimalString | None
    invoice_credited_usd: DecimalString | None
    invoice_amount_due_usd: DecimalString | None


class MonthlyReport(BaseModel):
    """The JSON form (streamed, one line per row of `data`)."""

    period: str = Field(examples=["2026-11"])
    data: list[ReportLine]
    totals: ReportTotals


class UnpricedReportRow(BaseModel):
    account_id: uuid.UUID
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    first_occurred_at: datetime
    last_occurred_at: datetime
    requests_priced_now: int = Field(
        description="Rows a price added since covers: a draft prices them by that version."
    )
    requests_without_price: int = Field(
        description="Rows no price covers even now: they block finalization."
    )


class UnpricedReport(BaseModel):
    period: str
    data: list[UnpricedReportRow]
