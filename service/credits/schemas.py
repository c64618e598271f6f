from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from service.db.models import CreditKind
from service.schemas import BillableTime, DecimalString, Page, Text

# NUMERIC(24, 12) like every amount; more than nothing.
CreditUSD = Annotated[Decimal, Field(gt=0, max_digits=24, decimal_places=12)]


class CreditCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    amount_usd: CreditUSD
    kind: CreditKind = Field(
        description="`purchase`: paid for by the customer (counts towards the pro tier);"
        " `grant`: given (promotional, goodwill)."
    )
    expires_at: BillableTime | None = Field(
        default=None, description="RFC 3339; what is left stops counting at this instant."
    )
    priority: int = Field(
        default=1, ge=0, le=1000, description="Lower is consumed first (then earlier expiry)."
    )
    reference: Text | None = Field(
        default=None, max_length=200, description="Your own reference: a payment, an order."
    )


class GrantStatus(StrEnum):
    ACTIVE = "active"
    EXPIRED = "expired"
    VOIDED = "voided"


class CreditGrantOut(BaseModel):
    id: uuid.UUID
    account_id: uuid.UUID
    kind: CreditKind
    amount_usd: DecimalString
    remaining_usd: DecimalString = Field(description="What it still holds (0 once ended).")
    priority: int
    expires_at: datetime | None
    voided_at: datetime | None
    reference: str | None
    created_at: datetime
    status: GrantStatus


class BalanceOut(BaseModel):
    account_id: uuid.UUID
    billing_mode: str
    balance_usd: DecimalString = Field(
        description="What the active grants hold after every cost recorded in the ledger."
    )
    reserved_usd: DecimalString = Field(
        description="Held by requests in flight, or settled and not yet in the ledger."
    )
    available_usd: DecimalString = Field(description="`balance_usd - reserved_usd`, at least 0.")
    uncovered_usd: DecimalString = Field(
        description="Usage since the first grant that no grant could pay (billed as usual)."
    )
    grants: list[CreditGrantOut] = Field(description="In consumption order.")


class TransactionKind(StrEnum):
    GRANT = "grant"  # credit put on the account
    DRAWDOWN = "drawdown"  # usage of one UTC day paid by one grant
    EXPIRY = "expiry"  # what a grant held when it expired
    VOID = "void"  # what a grant held when it was voided


class CreditTransaction(BaseModel):
    id: str = Field(description="Stable: the same transaction has the same id on every read.")
    kind: TransactionKind
    grant_id: uuid.UUID
    amount_usd: DecimalString = Field(description="Positive for a grant, negative otherwise.")
    occurred_at: datetime = Field(description="A drawdown: the start of what it covers.")
    day: str | None = Field(default=None, description="A drawdown's UTC day (YYYY-MM-DD).")


class CreditTransactions(Page[CreditTransaction]):
    pass
