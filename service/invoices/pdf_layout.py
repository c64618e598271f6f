"""The drawing of an invoice PDF with fpdf2 (see `service.invoices.pdf`).

A module of its own so that fpdf2, with the font and image libraries it loads (21 MB of
each worker's memory, measured), is imported only when the first PDF is drawn.
"""

from __future__ import annotations

from importlib.resources import files
from typing import Any

from fpdf import FPDF, XPos, YPos

from pricing.money import format_usd
from service.invoices.pdf import Issuer, unit_price
from service.invoices.schemas import InvoiceLineOut, InvoiceOut

FONTS = files("service.invoices") / "fonts"
ROUNDING_NOTE = (
    "Each line is rounded once, to the cent, half away from zero; the total is the sum of"
    " the rounded lines. The exact amount of each line is printed beneath it."
)
INK = (28, 32, 40)
MUTED = (105, 112, 125)
RULE = (210, 214, 222)
# Column widths (mm) of the lines table; A4 less 15 mm margins is 180 mm.
COLUMNS = (92.0, 22.0, 38.0, 28.0)


class _Document(FPDF):
    def __init__(self, invoice: InvoiceOut) -> None:
        super().__init__(format="A4", unit="mm")
        self.invoice = invoice
        self.set_margins(15, 15, 15)
        self.set_auto_page_break(True, margin=18)
        self.add_font("DejaVu", "", str(FONTS / "DejaVuSans.ttf"))
        self.add_font("DejaVu", "B", str(FONTS / "DejaVuSans-Bold.ttf"))
        self.set_title(f"Invoice {invoice.number or invoice.id}")
        self.set_creator("Meterline")
        self._word_widths: dict[tuple[str, str, float], dict[str, float]] = {}

    def footer(self) -> None:
        self.set_y(-12)
        self.set_font("DejaVu", "", 7)
        self.set_text_color(*MUTED)
        label = self.invoice.number or f"{self.invoice.status} {self.invoice.id}"
        self.cell(0, 4, f"{label} · page {self.page_no()} of {{nb}}", align="R")

    def header(self) -> None:
        if self.invoice.status == "finalized":
            return
        # A draft or a void invoice says so across every page, so no copy passes for a bill.
        with self.local_context(fill_opacity=1, text_color=(246, 214, 214)):
            self.set_font("DejaVu", "B", 72)
            with self.rotation(35, x=105, y=160):
                self.text(52, 175, self.invoice.status.upper())

    def wrap(self, text: str, width: float) -> list[str]:
        """`text` cut into lines no wider than `width` at the current font, at spaces.

        fpdf2's multi_cell measures every candidate line again character by character,
        seconds for a thousand lines; words repeat from line to line, so theirs are cached.
        """
        key = (self.font_family, self.font_style, self.font_size_pt)
        widths = self._word_widths.setdefault(key, {})
        space = widths.get(" ") or widths.setdefault(" ", self.get_string_width(" "))
        lines: list[str] = []
        current: list[str] = []
        used = 0.0
        for word in text.split(" "):
            size = widths.get(word)
            if size is None:
                size = widths[word] = self.get_string_width(word)
            if current and used + space + size > width:
                lines.append(" ".join(current))
                current, used = [], 0.0
            used += size + (space if current else 0.0)
            current.append(word)
        lines.append(" ".join(current))
        return lines

    def right_text(self, right: float, baseline: float, text: str) -> None:
        self.text(right - self.get_string_width(text), baseline, text)

    def text_line(
        self, text: str, size: float = 9, bold: bool = False, muted: bool = False
    ) -> None:
        self.set_font("DejaVu", "B" if bold else "", size)
        self.set_text_color(*(MUTED if muted else INK))
        self.cell(0, size * 0.5, text, new_x=XPos.LMARGIN, new_y=YPos.NEXT)


def _heading(pdf: _Document, invoice: InvoiceOut, customer: str, issuer: Issuer) -> None:
    top = pdf.get_y()
    pdf.text_line(issuer.name or "Issuer name not configured", 13, bold=True)
    for line in issuer.address:
        pdf.text_line(line)
    if issuer.tax_id:
        pdf.text_line(f"Tax ID: {issuer.tax_id}")
    left_bottom = pdf.get_y()

    pdf.set_xy(120, top)
    pdf.set_font("DejaVu", "B", 20)
    pdf.set_text_color(*INK)
    title = {"draft": "DRAFT INVOICE", "void": "VOID INVOICE"}.get(invoice.status, "INVOICE")
    pdf.cell(75, 9, title, align="R", new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    facts = [
        ("Number", invoice.number or "not numbered (draft)"),
        ("Period", f"{invoice.period} (UTC month)"),
        ("Status", invoice.status),
        ("Issued", invoice.finalized_at.strftime("%Y-%m-%d") if invoice.finalized_at else "-"),
        ("Currency", invoice.currency),
    ]
    for label, value in facts:
        pdf.set_x(120)
        pdf.set_font("DejaVu", "", 8.5)
        pdf.set_text_color(*MUTED)
        pdf.cell(25, 4.6, label)
        pdf.set_text_color(*INK)
        pdf.cell(50, 4.6, value, align="R", new_x=XPos.LMARGIN, new_y=YPos.NEXT)

    pdf.set_y(max(left_bottom, pdf.get_y()) + 8)
    pdf.text_line("BILL TO", 7.5, bold=True, muted=True)
    pdf.text_line(customer, 11, bold=True)
    pdf.text_line(f"Account {invoice.account_id}", 8, muted=True)
    if invoice.status == "void":
        pdf.ln(2)
        pdf.text_line(f"Voided: {invoice.void_reason or 'no reason given'}", 9, bold=True)
    elif invoice.status == "draft":
        pdf.ln(2)
        pdf.text_line("Draft: figures may change until the invoice is finalized.", 9, bold=True)
    pdf.ln(5)


def _table_header(pdf: _Document) -> None:
    pdf.set_font("DejaVu", "B", 8)
    pdf.set_text_color(*MUTED)
    for width, label, align in zip(
        COLUMNS,
        ("Description", "Quantity", "Unit price (USD)", "Amount (USD)"),
        "LRRR",
        strict=True,
    ):
        pdf.cell(width, 6, label, align=align)
    pdf.ln(6)
    pdf.set_draw_color(*RULE)
    pdf.line(pdf.l_margin, pdf.get_y(), pdf.l_margin + sum(COLUMNS), pdf.get_y())


def _line(pdf: _Document, line: InvoiceLineOut) -> None:
    """One line of the table. Drawn with `text` at computed positions rather than `cell`:
    several times faster, and a thousand-line invoice is thousands of strings."""
    description, quantity, unit, _ = COLUMNS
    pdf.set_font("DejaVu", "", 8)
    rows = pdf.wrap(line.description, description - 3)
    if pdf.will_page_break(3.6 * len(rows) + 4):
        pdf.add_page()
        _table_header(pdf)
        pdf.set_font("DejaVu", "", 8)
    top = pdf.get_y() + 1.2
    baseline = top + 2.7
    left = pdf.l_margin
    pdf.set_text_color(*INK)
    for i, row in enumerate(rows):
        pdf.text(left, baseline + 3.6 * i, row)
    pdf.right_text(left + description + quantity, baseline, f"{line.quantity:,}")
    pdf.right_text(left + description + quantity + unit, baseline, unit_price(line))
    right = left + sum(COLUMNS)
    pdf.set_font("DejaVu", "B", 8.5)
    pdf.right_text(right, baseline, format_usd(line.amount_usd))
    pdf.set_font("DejaVu", "", 6.5)
    pdf.set_text_color(*MUTED)
    pdf.right_text(right, baseline + 3.4, f"exact {format_usd(line.amount_exact_usd)}")
    pdf.set_y(top + max(3.6 * len(rows), 7) + 1.2)
    pdf.line(left, pdf.get_y(), right, pdf.get_y())


def _totals(pdf: _Document, invoice: InvoiceOut) -> None:
    if pdf.will_page_break(40):
        pdf.add_page()
    pdf.ln(3)
    label_width = sum(COLUMNS[:3])
    pdf.set_font("DejaVu", "B", 11)
    pdf.set_text_color(*INK)
    pdf.cell(label_width, 7, f"Total ({invoice.currency})", align="R")
    pdf.cell(COLUMNS[3], 7, format_usd(invoice.total_usd), align="R", new_x=XPos.LMARGIN)
    pdf.ln(7)
    pdf.set_font("DejaVu", "", 7.5)
    pdf.set_text_color(*MUTED)
    pdf.cell(label_width, 4, "Sum of the exact amounts", align="R")
    pdf.cell(COLUMNS[3], 4, format_usd(invoice.total_exact_usd), align="R")
    pdf.ln(8)
    pdf.multi_cell(0, 3.8, ROUNDING_NOTE)
    if invoice.unpriced_usage:
        pdf.ln(2)
        requests = sum(u.requests for u in invoice.unpriced_usage)
        pdf.set_text_color(160, 40, 40)
        pdf.multi_cell(
            0,
            3.8,
            f"{requests:,} requests have no price yet and are not billed on this draft;"
            " it cannot be finalized until a price covers them.",
        )


def _credit_notes(pdf: _Document, invoice: InvoiceOut) -> None:
    """The credit notes issued against the invoice, and what remains due: the invoice's own
    figures above stay as issued."""
    if not invoice.credit_notes:
        return
    if pdf.will_page_break(20 + 5 * len(invoice.credit_notes)):
        pdf.add_page()
    pdf.ln(6)
    pdf.text_line("CREDIT NOTES", 7.5, bold=True, muted=True)
    pdf.ln(1)
    label_width = sum(COLUMNS[:3])
    for note in invoice.credit_notes:
        pdf.set_font("DejaVu", "", 8.5)
        pdf.set_text_color(*INK)
        text = f"{note.number} ({note.issued_at:%Y-%m-%d}): {note.reason}"
        rows = pdf.wrap(text, label_width - 3)
        top = pdf.get_y()
        for i, row in enumerate(rows):
            pdf.text(pdf.l_margin, top + 3.4 + 4 * i, row)
        pdf.right_text(pdf.l_margin + sum(COLUMNS), top + 3.4, f"-{format_usd(note.amount_usd)}")
        pdf.set_y(top + 4 * len(rows) + 1)
    pdf.ln(2)
    pdf.set_font("DejaVu", "B", 11)
    pdf.set_text_color(*INK)
    pdf.cell(label_width, 7, f"Amount due ({invoice.currency})", align="R")
    pdf.cell(COLUMNS[3], 7, format_usd(invoice.amount_due_usd), align="R", new_x=XPos.LMARGIN)
    pdf.ln(7)


def draw(invoice: InvoiceOut, customer: str, issuer: Issuer) -> bytes:
    """`render_invoice_pdf`'s document: heading, every line, the totals, the credit notes."""
    pdf = _Document(invoice)
    pdf.add_page()
    _heading(pdf, invoice, customer, issuer)
    _table_header(pdf)
    for line in invoice.lines:
        _line(pdf, line)
    if not invoice.lines:
        pdf.ln(2)
        pdf.text_line("No billable usage in this period.", 9, muted=True)
    _totals(pdf, invoice)
    _credit_notes(pdf, invoice)
    output: Any = pdf.output()
    return bytes(output)
