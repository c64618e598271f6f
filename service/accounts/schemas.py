from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    computed_field,
    field_validator,
    model_validator,
)

from pricing.invoice import ExpiredTaskPolicy, FailedTaskPolicy
from service.auth.usability import KeyStatus, key_status
from service.db.models import BillingMode, Tier
from service.rate_cards.schemas import RateCardId
from service.schemas import BillableTime, DecimalString, Text

# Column bounds: NUMERIC(24, 12) for money, NUMERIC(8, 4) for a margin, INTEGER for limits.
BudgetUSD = Annotated[Decimal, Field(ge=0, max_digits=24, decimal_places=12)]
# A balance can never fall below 0: a threshold of 0 would never be crossed.
ThresholdUSD = Annotated[Decimal, Field(gt=0, max_digits=24, decimal_places=12)]
_THRESHOLD_DOC = (
    "Exact decimal string: a prepaid account whose balance falls below it is told by one"
    " `credits.low` webhook event (again after its next grant); null: never."
)
Margin = Annotated[Decimal, Field(ge=0, max_digits=8, decimal_places=4)]
PerMinute = Annotated[int, Field(ge=1, le=2_147_483_647)]
Name = Annotated[Text, Field(min_length=1, max_length=200)]


def _in_the_future(value: datetime) -> datetime:
    if value <= datetime.now(UTC):
        raise ValueError("must be in the future")
    return value


# A key's expiry, set when it is created or changed: to end a key now, revoke it.
Expiry = Annotated[BillableTime, AfterValidator(_in_the_future)]


class AccountCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Name
    tier: Tier = Tier.BASIC
    billing_mode: BillingMode = Field(
        default=BillingMode.POSTPAID,
        description="`postpaid`: usage is invoiced after the month. `prepaid`: every request"
        " is paid from the account's credits and refused (402) when they cannot pay it.",
    )
    monthly_budget_usd: BudgetUSD | None = None
    low_balance_threshold_usd: ThresholdUSD | None = Field(default=None, description=_THRESHOLD_DOC)
    quote_margin: Margin | None = Field(
        default=None, description="Margin on quotes (0.20 = 20 %); null: the server default."
    )
    failed_task_policy: FailedTaskPolicy = Field(
        default=FailedTaskPolicy.FREE,
        description="What a failed quoted task is billed: `free` (nothing) or `cost` (tokens).",
    )
    customer_reported_outcomes: bool = Field(
        default=False,
        description="Whether the account's own keys may report task outcomes"
        " (`POST /billing/tasks/{id}/complete`); otherwise only the admin does.",
    )
    expired_task_policy: ExpiredTaskPolicy = Field(
        default=ExpiredTaskPolicy.FIXED_PRICE,
        description="What a quoted task still open at its deadline is billed: `fixed_price`"
        " (its quote's price), `cost` (its tokens) or `free`.",
    )
    rate_limit_rpm: PerMinute | None = None
    rate_limit_tpm: PerMinute | None = None
    rate_card_id: RateCardId | None = Field(
        default=None,
        description="The rate card the account pays by (`GET /billing/rate-cards`); unset:"
        " list prices.",
    )
    rate_card_effective_from: BillableTime | None = Field(
        default=None, description="From when the rate card applies; default now."
    )


# Not columns of the account: an assignment of its rate card, kept with its history.
RATE_CARD_FIELDS = frozenset({"rate_card_id", "rate_card_effective_from"})


# An account always has these: a PATCH may leave them out, not set them to null.
NOT_NULLABLE = (
    "name",
    "tier",
    "billing_mode",
    "failed_task_policy",
    "customer_reported_outcomes",
    "expired_task_policy",
)


def _drop_null(schema: dict[str, Any]) -> None:
    """Document NOT_NULLABLE fields as optional but not nullable, as they are validated."""
    for name in NOT_NULLABLE:
        field = schema["properties"][name]
        options = [o for o in field.pop("anyOf", []) if o.get("type") != "null"]
        field.update(options[0] if len(options) == 1 else {"anyOf": options})
        field.pop("default", None)


class AccountUpdate(BaseModel):
    """PATCH: only the fields sent change; `null` clears an optional field."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_drop_null)

    name: Name | None = None
    tier: Tier | None = None
    billing_mode: BillingMode | None = None
    monthly_budget_usd: BudgetUSD | None = None
    low_balance_threshold_usd: ThresholdUSD | None = Field(default=None, description=_THRESHOLD_DOC)
    quote_margin: Margin | None = None
    failed_task_policy: FailedTaskPolicy | None = None
    customer_reported_outcomes: bool | None = None
    expired_task_policy: ExpiredTaskPolicy | None = None
    rate_limit_rpm: PerMinute | None = None
    rate_limit_tpm: PerMinute | None = None
    rate_card_id: RateCardId | None = Field(
        default=None,
        description="Pay by this rate card from `rate_card_effective_from` on; `null`: list"
        " prices from then on. The earlier assignments stay in the history"
        " (`GET /billing/accounts/{id}/rate-cards`).",
    )
    rate_card_effective_from: BillableTime | None = Field(
        default=None, description="From when `rate_card_id` applies; default now."
    )

    @field_validator(*NOT_NULLABLE, mode="before")
    @classmethod
    def _required_fields_cannot_be_cleared(cls, value: Any) -> Any:
        if value is None:
            raise ValueError("cannot be null")
        return value

    @model_validator(mode="after")
    def _effective_from_goes_with_a_rate_card(self) -> AccountUpdate:
        if "rate_card_effective_from" in self.model_fields_set and (
            "rate_card_id" not in self.model_fields_set
        ):
            raise ValueError("rate_card_effective_from goes with rate_card_id")
        return self

    def changes(self) -> dict[str, Any]:
        """The account's own columns sent (the rate card is an assignment, apart)."""
        return {f: getattr(self, f) for f in self.model_fields_set - RATE_CARD_FIELDS}


class AccountOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    name: str
    tier: Tier
    billing_mode: BillingMode
    monthly_budget_usd: DecimalString | None
    low_balance_threshold_usd: DecimalString | None = Field(description=_THRESHOLD_DOC)
    quote_margin: DecimalString | None
    failed_task_policy: FailedTaskPolicy
    customer_reported_outcomes: bool
    expired_task_policy: ExpiredTaskPolicy
    rate_limit_rpm: int | None
    rate_limit_tpm: int | None
    rate_card_id: int | None = Field(
        default=None, description="The rate card in force now; null: list prices."
    )
    created_at: datetime
    updated_at: datetime


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Text | None = Field(default=None, max_length=200)
    expires_at: Expiry | None = Field(
        default=None, description="RFC 3339; the key stops working at this instant."
    )


class KeyUpdate(BaseModel):
    """PATCH: only the fields sent change; `null` clears one (no key limit of its own: the
    account's apply; no expiry)."""

    model_config = ConfigDict(extra="forbid")

    name: Name | None = None
    rate_limit_rpm: PerMinute | None = Field(
        default=None, description="Requests per minute of this key, within its account's."
    )
    rate_limit_tpm: PerMinute | None = Field(
        default=None, description="Tokens per minute of this key, within its account's."
    )
    monthly_budget_usd: BudgetUSD | None = Field(
        default=None, description="Exact decimal string: the key's spending limit per month."
    )
    expires_at: Expiry | None = Field(
        default=None, description="RFC 3339, in the future; the key stops working then."
    )

    def changes(self) -> dict[str, Any]:
        return {field: getattr(self, field) for field in self.model_fields_set}


class KeyOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    account_id: uuid.UUID
    name: str | None
    prefix: str = Field(description="The first characters of the key, to recognise it.")
    created_at: datetime
    last_used_at: datetime | None = Field(
        description="The time of the key's latest request in the usage ledger."
    )
    revoked_at: datetime | None
    expires_at: datetime | None
    rate_limit_rpm: int | None = Field(description="The key's own limit; null: its account's.")
    rate_limit_tpm: int | None = Field(description="The key's own limit; null: its account's.")
    monthly_budget_usd: DecimalString | None = Field(description="The key's own monthly budget.")

    @computed_field  # type: ignore[prop-decorator]
    @property
    def status(self) -> KeyStatus:
        return key_status(self.revoked_at, self.expires_at, datetime.now(UTC))


class KeyCreated(KeyOut):
    key: str = Field(description="The key itself. Shown once, never again.")


class TierChangeOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    from_tier: Tier
    to_tier: Tier
    reason: str = Field(description="`admin` (changed by the admin) or `deposit` (credits bought).")
    changed_at: datetime


class TierChanges(BaseModel):
    data: list[TierChangeOut] = Field(description="Oldest first.")
