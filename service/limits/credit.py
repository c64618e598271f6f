"""An account's credit as the ledger stands: its grants, the usage they paid, what is left.

One computation serves the balance API, the credit transactions, invoices and the proxy's
enforcement (service/limits): the usage is what a month's budget counts
(`service.limits.repository.spend_by_span`), drawn from the grants as `pricing.credits`
says. Every figure is exact; `now` is passed in, so a test can put it anywhere.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from pricing.credits import Allocation, Credit, allocate, bounds
from pricing.prices import PriceBook
from service.db.models import CreditKind
from service.limits.repository import accounts_with_credit, grants_of, spend_by_span


@dataclass(frozen=True, slots=True)
class CreditLedger:
    grants: Sequence[Any]  # rows of `credit_grants`, oldest first
    credits: Sequence[Credit]
    cuts: Sequence[datetime]
    allocation: Allocation
    at: datetime

    @property
    def balance(self) -> Decimal:
        """What the grants active now still hold."""
        return self.allocation.available(self.credits, self.at)

    def changes_by(self, at: datetime) -> bool:
        """Whether a grant ended after this ledger was read, by `at`."""
        return any(
            ends is not None and self.at < ends <= at for ends in (c.ends_at for c in self.credits)
        )

    def available_at(self, at: datetime) -> Decimal:
        """What the grants active at `at` hold, as far as this ledger knows (a grant that
        ended since counts nothing; usage since is not drawn yet)."""
        return self.allocation.available(self.credits, at)


def credit_of(row: Any) -> Credit:
    return Credit(
        id=row.id,
        amount=row.amount_usd,
        created_at=row.created_at,
        expires_at=row.expires_at,
        voided_at=row.voided_at,
        priority=row.priority,
        purchased=row.kind == CreditKind.PURCHASE,
    )


async def credit_ledger(
    connection: AsyncConnection,
    account_id: uuid.UUID,
    now: datetime,
    book: PriceBook,
    extra_cuts: Iterable[datetime] = (),
) -> CreditLedger:
    """The account's credit at `now`; `extra_cuts` splits the usage further (per day)."""
    grants = await grants_of(connection, account_id)
    credits = [credit_of(row) for row in grants]
    cuts = bounds(credits, now, extra_cuts)
    usage: list[Decimal] = []
    if len(cuts) > 1:
        spent = await spend_by_span(connection, [account_id], None, cuts, book)
        usage = spent.get(account_id, [Decimal(0)] * (len(cuts) - 1))
    return CreditLedger(grants, credits, cuts, allocate(credits, cuts, usage), now)


async def credit_paid(
    connection: AsyncConnection,
    accounts: Sequence[uuid.UUID],
    periods: Mapping[uuid.UUID, Sequence[tuple[datetime, datetime]]],
    applied: Mapping[uuid.UUID, Decimal],
    book: PriceBook,
) -> dict[uuid.UUID, Decimal]:
    """What credit paid of the usage an invoice bills (accounts never given credit are left
    out): the invoice's `credits_applied`.

    An invoice bills its own month and the late rows of months invoiced before, so this is
    what the credit paid, as the ledger stands now, of the usage of every month `periods`
    names for the account (each finalized invoice's and this one's), less what the finalized
    invoices already `applied`. A late row paid by credit is then paid on the invoice that
    bills it; and when it took credit that, drawn in time order, a month invoiced since had
    counted, that month's invoice applied it already and the late row's bill stays due."""
    paid: dict[uuid.UUID, Decimal] = {}
    for account_id in sorted(await accounts_with_credit(connection, accounts)):
        spans = periods.get(account_id, ())
        if not spans:
            continue
        end = max(stop for _, stop in spans)
        cuts = [at for span in spans for at in span]
        ledger = await credit_ledger(connection, account_id, end, book, cuts)
        covered = sum(
            (
                amount
                for at, amount in zip(ledger.cuts, ledger.allocation.covered_by_span, strict=False)
                if any(start <= at < stop for start, stop in spans)
            ),
            Decimal(0),
        )
        paid[account_id] = max(covered - applied.get(account_id, Decimal(0)), Decimal(0))
    return paid
