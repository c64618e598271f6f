"""An invoice as a PDF document: what a customer's finance team files.

Drawn with fpdf2 (pure Python) in DejaVu Sans, embedded and subset, so any account name
prints and the text can be searched and extracted. Every figure is the API's own: the
lines' rounded amounts, their exact amounts beside them, and the total (the sum of the
rounded lines), then the credit notes issued against it and the amount due; nothing is
recomputed here. The drawing itself is `pdf_layout.py`, imported when the first PDF is
drawn.
"""

from __future__ import annotations

from dataclasses import dataclass

from pricing.money import format_usd
from pricing.price_table import format_rate
from service.invoices.schemas import InvoiceLineOut, InvoiceOut
from service.settings import Settings


@dataclass(frozen=True, slots=True)
class Issuer:
    name: str | None
    address: tuple[str, ...]
    tax_id: str | None

    @classmethod
    def from_settings(cls, settings: Settings) -> Issuer:
        return cls(
            settings.invoice_issuer_name,
            tuple(settings.invoice_issuer_address),
            settings.invoice_issuer_tax_id,
        )


def unit_price(line: InvoiceLineOut) -> str:
    """What one unit of the line costs, as the line was priced."""
    if line.unit_price_usd is not None:
        return f"{format_usd(line.unit_price_usd)} each"
    if line.input_usd_per_mtok is not None and line.output_usd_per_mtok is not None:
        return (
            f"in {format_rate(line.input_usd_per_mtok)} / out"
            f" {format_rate(line.output_usd_per_mtok)} per 1M tok"
        )
    return "-"


def render_invoice_pdf(invoice: InvoiceOut, customer: str, issuer: Issuer) -> bytes:
    """The invoice as PDF bytes: issuer, customer, period, status, every line, the total."""
    # Imported here, not at the top: fpdf2 costs each worker 21 MB it would otherwise carry
    # from start-up, whether or not it ever draws a PDF.
    from service.invoices.pdf_layout import draw

    return draw(invoice, customer, issuer)


def pdf_filename(invoice: InvoiceOut) -> str:
    return f"{invoice.number or f'invoice-{invoice.period}-{invoice.status}'}.pdf"
