from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Response, status
from sqlalchemy.ext.asyncio import AsyncSession

from pricing.invoice import InvoiceStatus
from service.deps import Admin, Caller, Config, Session
from service.errors import API_ERRORS, errors
from service.idempotency.service import IdempotencyKeyHeader, IdempotencyKeyReused, idempotent
from service.invoices import credit_notes, service
from service.invoices.flagged import FlaggedUsage
from service.invoices.pdf import Issuer
from service.invoices.schemas import (
    CreditNoteCreate,
    CreditNoteOut,
    InvoiceCreate,
    InvoiceOut,
    InvoiceVoid,
    invoice_out,
)
from service.schemas import CursorParam, Limit, Page, Period, links

CREDIT_NOTES = "POST /billing/invoices/{invoice_id}/credit-notes"

PeriodQuery = Annotated[Period, Query(description="UTC month, `YYYY-MM`.")]

router = APIRouter(prefix="/billing", tags=["invoices"], responses=errors(*API_ERRORS))

_INVOICE_ID = {"path.invoice_id": "$response.body#/id"}
INVOICE = links(
    GetInvoice=("GET", "/billing/invoices/{invoice_id}", _INVOICE_ID),
    FinalizeInvoice=("POST", "/billing/invoices/{invoice_id}/finalize", _INVOICE_ID),
    VoidInvoice=("POST", "/billing/invoices/{invoice_id}/void", _INVOICE_ID),
)


@router.post(
    "/invoices",
    response_model=InvoiceOut,
    status_code=status.HTTP_201_CREATED,
    responses={
        **errors(*API_ERRORS, service.PeriodInFuture, service.InvoiceFinalized),
        200: {"model": InvoiceOut, "description": "An existing draft, refreshed.", **INVOICE},
        201: INVOICE,
    },
)
async def generate_invoice(
    data: InvoiceCreate, session: Session, response: Response, _: Admin
) -> InvoiceOut:
    """Make the account's draft for the month, or refresh it from the ledger (admin).

    A finalized invoice never changes: 409 (void it first to issue a new one).
    """
    invoice, created = await service.generate_one(session, data.account_id, data.period)
    if not created:
        response.status_code = status.HTTP_200_OK
    return invoice_out(invoice)


@router.get("/invoices", response_model=Page[InvoiceOut])
async def list_invoices(
    session: Session,
    caller: Caller,
    account_id: uuid.UUID | None = None,
    period: PeriodQuery | None = None,
    status_: Annotated[InvoiceStatus | None, Query(alias="status")] = None,
    limit: Limit = 50,
    cursor: CursorParam = None,
) -> Page[InvoiceOut]:
    """Invoices, newest month first. A customer key sees only its own account's."""
    return await service.list_invoices(session, caller, account_id, period, status_, limit, cursor)


@router.get("/invoices/{invoice_id}", response_model=InvoiceOut)
async def get_invoice(invoice_id: uuid.UUID, session: Session, caller: Caller) -> InvoiceOut:
    """One invoice with its lines. A customer key reads only its own account's."""
    return invoice_out(await service.get_for(session, caller, invoice_id))


@router.get(
    "/invoices/{invoice_id}/pdf",
    response_class=Response,
    responses={200: {"content": {"application/pdf": {}}, "description": "The invoice as PDF."}},
)
async def invoice_pdf(
    invoice_id: uuid.UUID, session: Session, caller: Caller, settings: Config
) -> Response:
    """The invoice as a PDF document (a draft or void one is marked so on every page)."""
    document, filename = await service.invoice_document(
        session, caller, invoice_id, Issuer.from_settings(settings)
    )
    return Response(
        document,
        media_type="application/pdf",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


@router.post(
    "/invoices/{invoice_id}/finalize",
    response_model=InvoiceOut,
    responses=errors(
        *API_ERRORS,
        service.InvoiceNotDraft,
        service.PeriodNotOver,
        service.LedgerWriteInProgress,
        FlaggedUsage,
        service.UsageWithoutPrice,
    ),
)
async def finalize_invoice(
    invoice_id: uuid.UUID, session: Session, settings: Config, _: Admin
) -> InvoiceOut:
    """Refresh the draft from the ledger, freeze it and give it the next number (admin).

    409 while its month is not over, while a ledger write begun before the month ended is
    still open (after waiting `METERLINE_INVOICE_FINALIZE_WAIT_S`), and while usage without
    a price remains.
    """
    wait_s = settings.invoice_finalize_wait_s
    return invoice_out(await service.finalize(session, invoice_id, wait_s=wait_s))


@router.post(
    "/invoices/{invoice_id}/void",
    response_model=InvoiceOut,
    responses=errors(*API_ERRORS, service.InvoiceNotFinalized),
)
async def void_invoice(
    invoice_id: uuid.UUID, data: InvoiceVoid, session: Session, _: Admin
) -> InvoiceOut:
    """Void a finalized invoice (admin): it keeps its number and records the reason."""
    return invoice_out(await service.void(session, invoice_id, data.reason))


@router.post(
    "/invoices/{invoice_id}/credit-notes",
    response_model=CreditNoteOut,
    status_code=status.HTTP_201_CREATED,
    responses=errors(
        *API_ERRORS,
        credit_notes.InvoiceNotCreditable,
        credit_notes.CreditExceedsInvoice,
        IdempotencyKeyReused,
    ),
)
async def create_credit_note(
    invoice_id: uuid.UUID,
    data: CreditNoteCreate,
    session: Session,
    _: Admin,
    idempotency_key: IdempotencyKeyHeader = None,
) -> CreditNoteOut:
    """Give money back against a finalized invoice (admin): a credit note numbered
    `CN-YYYY-NNNNNN`, never more than the invoice's remaining total. The invoice itself does
    not change; it lists its credit notes and what remains due. Draft or void: 409.
    """
    return await credit_note_once(session, invoice_id, data, idempotency_key)


async def credit_note_once(
    session: AsyncSession, invoice_id: uuid.UUID, data: CreditNoteCreate, key: str | None
) -> CreditNoteOut:
    """The credit note, once per idempotency key: the API's and the console's one way."""

    async def issue() -> CreditNoteOut:
        return await credit_notes.issue(session, invoice_id, data)

    request = {"invoice_id": str(invoice_id), "body": data.model_dump(mode="json")}
    return await idempotent(session, CREDIT_NOTES, key, request, issue, CreditNoteOut)
