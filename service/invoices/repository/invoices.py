"""Invoice rows: drafts written and refreshed, read, numbered, finalized and voided; the
account locks that serialise invoice work."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any, cast

from sqlalchemy import Table, and_, any_, bindparam, delete, func, insert, or_, select, text, update
from sqlalchemy.orm import selectinload

from pricing.invoice import BilledWindow, LineKind
from service.db.models import (
    Account,
    CreditNote,
    Invoice,
    InvoiceLine,
    InvoiceUsageWindow,
    NumberSeries,
)
from service.db.repository import Repository, readable
from service.invoices.repository.sums import UUIDS

INVOICES = cast(Table, Invoice.__table__)
# What an invoice is read with: its lines, and its credit notes with theirs.
WHOLE = (
    selectinload(Invoice.lines),
    selectinload(Invoice.credit_notes).selectinload(CreditNote.lines),
)
LINES = cast(Table, InvoiceLine.__table__)
WINDOWS = cast(Table, InvoiceUsageWindow.__table__)


class InvoiceRepository(Repository):
    # -- accounts --------------------------------------------------------------------------

    async def lock_accounts(self, account_ids: Sequence[uuid.UUID]) -> list[uuid.UUID]:
        """Serialise invoice work per account; returns the accounts that exist.

        FOR NO KEY UPDATE, not FOR UPDATE: new keys and invoices referencing the account
        (foreign keys take KEY SHARE) are not held up.
        """
        rows = await self.session.scalars(
            select(Account.id)
            .where(Account.id == any_(bindparam("ids", list(account_ids), type_=UUIDS)))
            .order_by(Account.id)
            .with_for_update(key_share=True)
        )
        return list(rows)

    async def account_ids(self, created_before: datetime) -> list[uuid.UUID]:
        rows = await self.session.scalars(
            select(Account.id).where(Account.created_at < created_before).order_by(Account.id)
        )
        return list(rows)

    # -- invoices --------------------------------------------------------------------------

    async def live_invoices(
        self, account_ids: Sequence[uuid.UUID], period: str
    ) -> dict[uuid.UUID, Invoice]:
        """The draft or finalized invoice of each account for `period`."""
        rows = await self.session.scalars(
            select(Invoice).where(
                Invoice.account_id == any_(bindparam("accounts", list(account_ids), type_=UUIDS)),
                Invoice.period == period,
                Invoice.status != "void",
            )
        )
        return {invoice.account_id: invoice for invoice in rows}

    async def billed_windows(
        self, account_ids: Sequence[uuid.UUID]
    ) -> dict[uuid.UUID, dict[str, list[BilledWindow]]]:
        """The windows finalized invoices bill, per account and usage period."""
        rows = await self.session.execute(
            select(
                Invoice.account_id,
                InvoiceUsageWindow.period,
                InvoiceUsageWindow.recorded_after,
                InvoiceUsageWindow.recorded_until,
            )
            .join(Invoice, Invoice.id == InvoiceUsageWindow.invoice_id)
            .where(
                Invoice.account_id == any_(bindparam("accounts", list(account_ids), type_=UUIDS)),
                Invoice.status == "finalized",
            )
        )
        billed: dict[uuid.UUID, dict[str, list[BilledWindow]]] = {}
        for r in rows:
            windows = billed.setdefault(r.account_id, {}).setdefault(r.period, [])
            windows.append(BilledWindow(r.recorded_after, r.recorded_until))
        return billed

    async def finalized_periods(
        self, account_ids: Sequence[uuid.UUID]
    ) -> dict[uuid.UUID, set[str]]:
        rows = await self.session.execute(
            select(Invoice.account_id, Invoice.period).where(
                Invoice.account_id == any_(bindparam("accounts", list(account_ids), type_=UUIDS)),
                Invoice.status == "finalized",
            )
        )
        periods: dict[uuid.UUID, set[str]] = {}
        for r in rows:
            periods.setdefault(r.account_id, set()).add(r.period)
        return periods

    async def credits_applied(self, account_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, Decimal]:
        """What each account's finalized invoices applied of its credit, exact (positive)."""
        rows = await self.session.execute(
            select(Invoice.account_id, func.sum(InvoiceLine.amount_exact_usd))
            .join(InvoiceLine, InvoiceLine.invoice_id == Invoice.id)
            .where(
                Invoice.account_id == any_(bindparam("accounts", list(account_ids), type_=UUIDS)),
                Invoice.status == "finalized",
                InvoiceLine.kind == LineKind.CREDITS_APPLIED,
            )
            .group_by(Invoice.account_id)
        )
        return {account: -amount for account, amount in rows}

    async def insert_invoices(self, values: list[dict[str, Any]]) -> dict[uuid.UUID, uuid.UUID]:
        """New drafts; returns account id → invoice id."""
        if not values:
            return {}
        rows = await self.session.execute(
            insert(INVOICES).returning(Invoice.id, Invoice.account_id), values
        )
        return {r.account_id: r.id for r in rows}

    async def update_drafts(self, values: list[dict[str, Any]]) -> None:
        """Refresh existing drafts (each dict carries `b_id`) and drop their old lines."""
        if not values:
            return
        table = INVOICES
        await self.session.execute(
            update(table)
            .where(table.c.id == bindparam("b_id"), table.c.status == "draft")
            .values(
                total_usd=bindparam("total_usd"),
                usage_cutoff=bindparam("usage_cutoff"),
                unpriced_usage=bindparam("unpriced_usage"),
                updated_at=func.now(),
            ),
            values,
        )
        ids = [v["b_id"] for v in values]
        await self.delete_contents(ids)

    async def delete_contents(self, invoice_ids: Iterable[uuid.UUID]) -> None:
        ids = bindparam("ids", list(invoice_ids), type_=UUIDS)
        await self.session.execute(delete(LINES).where(LINES.c.invoice_id == any_(ids)))
        await self.session.execute(delete(WINDOWS).where(WINDOWS.c.invoice_id == any_(ids)))

    async def insert_lines(self, values: list[dict[str, Any]]) -> None:
        await self._copy(LINES, values)

    async def insert_windows(self, values: list[dict[str, Any]]) -> None:
        await self._copy(WINDOWS, values)

    async def _copy(self, table: Table, values: list[dict[str, Any]]) -> None:
        """COPY into `table` in this session's transaction: a bulk run writes tens of
        thousands of lines, which row-by-row INSERTs would take seconds to."""
        if not values:
            return
        columns = list(values[0])
        connection = await (await self.session.connection()).get_raw_connection()
        await connection.driver_connection.copy_records_to_table(  # type: ignore[union-attr]
            table.name, records=[tuple(v[c] for c in columns) for v in values], columns=columns
        )

    async def get(self, invoice_id: uuid.UUID, lock: bool = False) -> Invoice | None:
        statement = (
            select(Invoice)
            .where(Invoice.id == invoice_id)
            .options(*WHOLE)
            .execution_options(populate_existing=True)
        )
        if lock:
            statement = statement.with_for_update(of=Invoice)
        invoice: Invoice | None = await self.session.scalar(statement)
        return invoice

    async def get_many(self, invoice_ids: Sequence[uuid.UUID]) -> list[Invoice]:
        rows = await self.session.scalars(
            select(Invoice)
            .where(Invoice.id == any_(bindparam("ids", list(invoice_ids), type_=UUIDS)))
            .options(*WHOLE)
            .execution_options(populate_existing=True)
            .order_by(Invoice.account_id)
        )
        return list(rows)

    async def account_of(self, invoice_id: uuid.UUID) -> uuid.UUID | None:
        account: uuid.UUID | None = await self.session.scalar(
            select(Invoice.account_id).where(Invoice.id == invoice_id)
        )
        return account

    async def list(
        self,
        account_id: uuid.UUID | None,
        period: str | None,
        status: str | None,
        limit: int,
        after: tuple[str, uuid.UUID] | None,
    ) -> list[Invoice]:
        """Newest period first, then by id; `after` is the (period, id) of the previous page."""
        statement = readable(select(Invoice).options(*WHOLE), Invoice.account_id, account_id)
        if period is not None:
            statement = statement.where(Invoice.period == period)
        if status is not None:
            statement = statement.where(Invoice.status == status)
        if after is not None:
            statement = statement.where(
                or_(
                    Invoice.period < after[0],
                    and_(Invoice.period == after[0], Invoice.id > after[1]),
                )
            )
        statement = statement.order_by(Invoice.period.desc(), Invoice.id).limit(limit)
        return list(await self.session.scalars(statement))

    async def next_number(self, series: NumberSeries, year: int) -> int:
        """The next number of `series` in `year`. The counter row stays locked until commit,
        so numbers are handed out in commit order, and a rolled-back issue (a finalization,
        a credit note) gives its number back: the sequence has no gaps."""
        number: int = (
            await self.session.execute(
                text(
                    "INSERT INTO invoice_number_counters (series, year, last_number)"
                    " VALUES (:series, :year, 1)"
                    " ON CONFLICT (series, year) DO UPDATE"
                    " SET last_number = invoice_number_counters.last_number + 1"
                    " RETURNING last_number"
                ),
                {"series": series.value, "year": year},
            )
        ).scalar_one()
        return number

    async def mark_finalized(self, invoice_id: uuid.UUID, number: str, at: datetime) -> None:
        await self.session.execute(
            update(Invoice)
            .where(Invoice.id == invoice_id, Invoice.status == "draft")
            .values(status="finalized", number=number, finalized_at=at, updated_at=func.now())
        )

    async def mark_void(self, invoice_id: uuid.UUID, reason: str, at: datetime) -> None:
        await self.session.execute(
            update(Invoice)
            .where(Invoice.id == invoice_id, Invoice.status == "finalized")
            .values(status="void", void_reason=reason, voided_at=at, updated_at=func.now())
        )
