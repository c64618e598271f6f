"""Credit notes: money given back against a finalized invoice, which never changes.

A credit note is a document of its own, numbered gaplessly per year by the invoices'
counter (series `CN`: `CN-2026-000001`). Together an invoice's credit notes never exceed
its total: the invoice row is locked while the remaining total is read and the note
written, so concurrent notes are serialised and the last to come finds what the others
left. The invoice shows them, and its `amount_due_usd` is its total less them.
"""

from __future__ import annotations

import logging
import uuid

from sqlalchemy.ext.asyncio import AsyncSession

from service.db.models import Invoice, NumberSeries
from service.errors import Conflict
from service.invoices.repository.credit_notes import CreditNoteRepository
from service.invoices.repository.invoices import InvoiceRepository
from service.invoices.schemas import CreditNoteCreate, CreditNoteOut, amount_due
from service.invoices.service import invoice_not_found
from service.webhooks.events import EventType
from service.webhooks.outbox import raise_event

log = logging.getLogger("meterline.invoices")


class InvoiceNotCreditable(Conflict):
    code = "invoice_not_finalized"
    description = (
        "Only a finalized invoice is credited (a draft still changes; a void one bills nothing)."
    )


class CreditExceedsInvoice(Conflict):
    code = "credit_exceeds_invoice"
    description = "The credit note is more than the invoice's remaining total."


async def issue(
    session: AsyncSession, invoice_id: uuid.UUID, data: CreditNoteCreate
) -> CreditNoteOut:
    repository = InvoiceRepository(session)
    invoice = await repository.get(invoice_id, lock=True)
    if invoice is None:
        raise invoice_not_found(invoice_id)
    if invoice.status != "finalized":
        raise InvoiceNotCreditable(
            f"invoice {invoice.number or invoice.id} is {invoice.status}; only a finalized"
            " invoice takes credit notes"
        )
    remaining = amount_due(invoice)
    if data.amount_usd > remaining:
        raise CreditExceedsInvoice(
            f"invoice {invoice.number} has {remaining} USD left to credit"
            f" (total {invoice.total_usd} less earlier credit notes); {data.amount_usd} is more",
            param="body.amount_usd",
        )
    now = await repository.now()
    sequence = await repository.next_number(NumberSeries.CREDIT_NOTE, now.year)
    number = f"{NumberSeries.CREDIT_NOTE}-{now.year}-{sequence:06d}"
    lines = [(line.description, line.amount_usd) for line in data.lines or []] or [
        (data.reason, data.amount_usd)
    ]
    note_id = await CreditNoteRepository(session).add(
        number, invoice.id, invoice.account_id, data.amount_usd, data.reason, lines
    )
    await raise_event(
        session,
        EventType.CREDIT_NOTE_CREATED,
        {
            "credit_note_id": str(note_id),
            "number": number,
            "invoice_id": str(invoice.id),
            "account_id": str(invoice.account_id),
            "amount_usd": f"{data.amount_usd:f}",
            "reason": data.reason,
        },
        invoice.account_id,
    )
    log.info(
        "event=credit_note_issued credit_note=%s invoice=%s account_id=%s amount_usd=%s",
        number,
        invoice.number,
        invoice.account_id,
        data.amount_usd,
    )
    reread = await repository.get(invoice.id)
    assert reread is not None
    return _note_of(reread, note_id)


def _note_of(invoice: Invoice, note_id: uuid.UUID) -> CreditNoteOut:
    note = next(n for n in invoice.credit_notes if n.id == note_id)
    return CreditNoteOut.model_validate(note)
