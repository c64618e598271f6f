"""Credit notes: issued with their lines against a locked invoice."""

from __future__ import annotations

import uuid
from decimal import Decimal

from sqlalchemy import insert

from service.db.models import CreditNote, CreditNoteLine
from service.db.repository import Repository


class CreditNoteRepository(Repository):
    async def add(
        self,
        number: str,
        invoice_id: uuid.UUID,
        account_id: uuid.UUID,
        amount_usd: Decimal,
        reason: str,
        lines: list[tuple[str, Decimal]],
    ) -> uuid.UUID:
        note_id: uuid.UUID = (
            await self.session.execute(
                insert(CreditNote)
                .values(
                    number=number,
                    invoice_id=invoice_id,
                    account_id=account_id,
                    amount_usd=amount_usd,
                    reason=reason,
                )
                .returning(CreditNote.id)
            )
        ).scalar_one()
        await self.session.execute(
            insert(CreditNoteLine),
            [
                {
                    "credit_note_id": note_id,
                    "position": position,
                    "description": description,
                    "amount_usd": amount,
                }
                for position, (description, amount) in enumerate(lines)
            ],
        )
        return note_id
