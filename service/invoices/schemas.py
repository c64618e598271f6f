from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from service.db.models import Invoice
from service.schemas import DecimalString, Period, Text

InvoiceStatus = Literal["draft", "finalized", "void"]
LineKindName = Literal["tokens", "task", "late_usage", "late_task", "adjustment"]


class InvoiceCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    account_id: uuid.UUID
    period: Period = Field(description="UTC calendar month, `YYYY-MM`.", examples=["2026-11"])


class InvoiceVoid(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: Text = Field(min_length=1, max_length=2000, description="Why; kept on the invoice.")


class InvoiceLineOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    kind: LineKindName
    description: str
    model: str | None
    task_type: str | None
    period: str | None = Field(
        description="Late usage: the month the usage belongs to; late task: the month the"
        " task completed in."
    )
    price_version_id: int | None
    quantity: int = Field(description="Requests for token lines, tasks for task lines.")
    prompt_tokens: int | None
    completion_tokens: int | None
    cached_tokens: int | None
    input_usd_per_mtok: DecimalString | None
    output_usd_per_mtok: DecimalString | None
    cached_input_usd_per_mtok: DecimalString | None
    unit_price_usd: DecimalString | None = Field(description="Task lines: the fixed price.")
    amount_exact_usd: DecimalString = Field(description="Exact, unrounded.")
    amount_usd: DecimalString = Field(description="Rounded once, to cents, half away from zero.")


class UnpricedUsageOut(BaseModel):
    model: str
    period: str | None = Field(description="Set for late usage of an earlier month.")
    task_type: str | None = Field(description="Set for the usage of a failed quoted task.")
    requests: int
    prompt_tokens: int
    completion_tokens: int


class InvoiceOut(BaseModel):
    id: uuid.UUID
    number: str | None = Field(description="Given at finalization: `INV-YYYY-NNNNNN`.")
    account_id: uuid.UUID
    period: str
    status: InvoiceStatus
    currency: str
    lines: list[InvoiceLineOut]
    total_usd: DecimalString = Field(description="The sum of the rounded lines.")
    total_exact_usd: DecimalString = Field(description="The sum of the lines' exact amounts.")
    usage_cutoff: datetime | None = Field(
        description="Ledger rows recorded up to this instant are covered; later ones of this"
        " month go on a later invoice as late usage."
    )
    unpriced_usage: list[UnpricedUsageOut] = Field(
        description="Usage no price covers: the draft cannot be finalized until prices exist."
    )
    created_at: datetime
    updated_at: datetime
    finalized_at: datetime | None
    voided_at: datetime | None
    void_reason: str | None


class GenerateSummary(BaseModel):
    period: str
    drafts: int
    created: int
    skipped_finalized: int
    total_usd: Decimal


def invoice_out(invoice: Invoice) -> InvoiceOut:
    """The API shape of an `Invoice` row (lines loaded)."""
    lines = [InvoiceLineOut.model_validate(line) for line in invoice.lines]
    return InvoiceOut(
        id=invoice.id,
        number=invoice.number,
        account_id=invoice.account_id,
        period=invoice.period,
        status=invoice.status,
        currency=invoice.currency,
        lines=lines,
        total_usd=invoice.total_usd,
        total_exact_usd=sum((line.amount_exact_usd for line in invoice.lines), Decimal(0)),
        usage_cutoff=invoice.usage_cutoff,
        unpriced_usage=[UnpricedUsageOut.model_validate(u) for u in invoice.unpriced_usage or []],
        created_at=invoice.created_at,
        updated_at=invoice.updated_at,
        finalized_at=invoice.finalized_at,
        voided_at=invoice.voided_at,
        void_reason=invoice.void_reason,
    )
