from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pricing.invoice import InvoiceStatus, LineKind
from service.db.models import CreditNote, Invoice
from service.schemas import DecimalString, Period, Prose, Text


class InvoiceCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    account_id: uuid.UUID
    period: Period = Field(description="UTC calendar month, `YYYY-MM`.", examples=["2026-11"])


class InvoiceVoid(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: Text = Field(min_length=1, max_length=2000, description="Why; kept on the invoice.")


# A credit note gives back rounded money, as the invoice billed it: cents, more than zero.
CreditAmount = Annotated[
    Decimal,
    Field(
        gt=0,
        max_digits=18,
        decimal_places=2,
        allow_inf_nan=False,
        description="Exact decimal string in cents, more than zero.",
        examples=["12.50"],
    ),
]


class CreditNoteLineIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    description: Text = Field(min_length=1, max_length=500)
    amount_usd: CreditAmount


class CreditNoteCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    amount_usd: CreditAmount = Field(
        description="At most the invoice's remaining total (its total less earlier credit notes)."
    )
    reason: Prose = Field(min_length=1, max_length=2000)
    lines: list[CreditNoteLineIn] | None = Field(
        default=None,
        max_length=100,
        description="What is given back, line by line; they add up to `amount_usd`."
        " Default: one line, the reason.",
    )

    @model_validator(mode="after")
    def _lines_add_up(self) -> CreditNoteCreate:
        if self.lines is not None:
            total = sum((line.amount_usd for line in self.lines), Decimal(0))
            if not self.lines or total != self.amount_usd:
                raise ValueError(f"lines add up to {total}, not amount_usd {self.amount_usd}")
        return self


class CreditNoteLineOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    description: str
    amount_usd: DecimalString


class CreditNoteOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    number: str = Field(description="`CN-YYYY-NNNNNN`, gapless per year.")
    invoice_id: uuid.UUID
    account_id: uuid.UUID
    amount_usd: DecimalString
    reason: str
    lines: list[CreditNoteLineOut]
    issued_at: datetime


class InvoiceLineOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    kind: LineKind
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
    credit_notes: list[CreditNoteOut] = Field(description="Issued against it, oldest first.")
    credited_usd: DecimalString = Field(description="The sum of its credit notes.")
    amount_due_usd: DecimalString = Field(
        description="`total_usd` less `credited_usd` (0 for a void invoice): what remains to"
        " be paid, and the most a new credit note may give back."
    )
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
    credited = credited_usd(invoice.credit_notes)
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
        credit_notes=[CreditNoteOut.model_validate(note) for note in invoice.credit_notes],
        credited_usd=credited,
        amount_due_usd=amount_due(invoice),
        usage_cutoff=invoice.usage_cutoff,
        unpriced_usage=[UnpricedUsageOut.model_validate(u) for u in invoice.unpriced_usage or []],
        created_at=invoice.created_at,
        updated_at=invoice.updated_at,
        finalized_at=invoice.finalized_at,
        voided_at=invoice.voided_at,
        void_reason=invoice.void_reason,
    )


def credited_usd(notes: list[CreditNote]) -> Decimal:
    return sum((note.amount_usd for note in notes), Decimal("0.00"))


def amount_due(invoice: Invoice) -> Decimal:
    """What remains of the invoice to pay: its total less its credit notes; nothing once
    void (a void invoice bills nothing). The ceiling of a new credit note."""
    if invoice.status == "void":
        return Decimal("0.00")
    return invoice.total_usd - credited_usd(invoice.credit_notes)
