"""ORM models of the whole schema. The schema changes only through an Alembic migration."""

from __future__ import annotations

import uuid
from datetime import date, datetime
from decimal import Decimal
from enum import StrEnum

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Computed,
    Date,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    LargeBinary,
    Numeric,
    PrimaryKeyConstraint,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    false,
    func,
    text,
    true,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID
from sqlalchemy.orm import Mapped, mapped_column, relationship

from pricing.invoice import (
    ExpiredTaskPolicy,
    FailedTaskPolicy,
    InvoiceStatus,
    LineKind,
    TaskBilling,
    TaskStatus,
)
from pricing.quote import CostSource, QuoteBasis
from pricing.rate_cards import MarkupBasis
from service.db.base import (
    Base,
    CentsUSD,
    ExactUSD,
    RateUSD,
    TokenCount,
    UTCDateTime,
    Vocabulary,
    one_of,
)
from service.ledger.record import BatchSource, LedgerKind, UsageSource


# The vocabularies of the columns below that no domain package owns (the others come from
# `pricing` and the ledger). Each is the column's type, its check constraint and its schema.
class Tier(StrEnum):
    """An account's default rate limits (`service.limits.policy`); `custom` sets its own."""

    BASIC = "basic"
    PRO = "pro"
    CUSTOM = "custom"


class BillingMode(StrEnum):
    """How an account pays: invoiced after the month (`postpaid`), or from credits bought
    beforehand, each request refused when they cannot pay it (`prepaid`)."""

    POSTPAID = "postpaid"
    PREPAID = "prepaid"


class CreditKind(StrEnum):
    """Credit the customer paid for (`purchase`: counts towards the pro tier) or was given."""

    PURCHASE = "purchase"
    GRANT = "grant"


class ReviewDecision(StrEnum):
    """An operator's decision on a flagged ledger row."""

    ACCEPTED = "accepted"  # billed as the provider claimed it
    ADJUSTED = "adjusted"  # corrected by an adjustment row


def _uuid_pk() -> Mapped[uuid.UUID]:
    return mapped_column(
        UUID(as_uuid=True), primary_key=True, server_default=text("gen_random_uuid()")
    )


def _created_at() -> Mapped[datetime]:
    return mapped_column(DateTime(timezone=True), server_default=func.now())


class Account(Base):
    __tablename__ = "accounts"
    __table_args__ = (
        one_of("failed_task_policy", FailedTaskPolicy),
        one_of("expired_task_policy", ExpiredTaskPolicy),
        one_of("tier", Tier),
        one_of("billing_mode", BillingMode),
    )

    id: Mapped[uuid.UUID] = _uuid_pk()
    name: Mapped[str] = mapped_column(String(200))
    tier: Mapped[Tier] = mapped_column(Vocabulary(Tier, 16), server_default=Tier.BASIC.value)
    billing_mode: Mapped[BillingMode] = mapped_column(
        Vocabulary(BillingMode, 16), server_default=BillingMode.POSTPAID.value
    )
    monthly_budget_usd: Mapped[ExactUSD | None]
    # A prepaid account whose balance falls below it is told once (`credits.low`).
    low_balance_threshold_usd: Mapped[ExactUSD | None]
    # Outcome pricing: margin added on top of a quote's cost basis (0.20 = 20 %).
    quote_margin: Mapped[Decimal | None] = mapped_column(Numeric(8, 4))
    failed_task_policy: Mapped[FailedTaskPolicy] = mapped_column(
        Vocabulary(FailedTaskPolicy, 8), server_default=FailedTaskPolicy.FREE.value
    )
    # Whether the account's own keys may report task outcomes (else only the operator).
    customer_reported_outcomes: Mapped[bool] = mapped_column(Boolean, server_default=false())
    # How a quoted task that expired open is billed: its fixed price, its token cost, or free.
    expired_task_policy: Mapped[ExpiredTaskPolicy] = mapped_column(
        Vocabulary(ExpiredTaskPolicy, 16), server_default=ExpiredTaskPolicy.FIXED_PRICE.value
    )
    # Custom limits override the tier's (None = the tier's default).
    rate_limit_rpm: Mapped[int | None] = mapped_column(Integer)
    rate_limit_tpm: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )

    keys: Mapped[list[ApiKey]] = relationship(back_populates="account", lazy="raise")


class CreditGrant(Base):
    """Credit put on an account: it pays the account's usage from `created_at` until it is
    spent, expires or is voided (service/credits). Never deleted; a void sets `voided_at`."""

    __tablename__ = "credit_grants"
    __table_args__ = (
        Index("ix_credit_grants_account_id", "account_id"),
        one_of("kind", CreditKind),
        CheckConstraint("amount_usd > 0", name="amount_positive"),
    )

    id: Mapped[uuid.UUID] = _uuid_pk()
    account_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    kind: Mapped[CreditKind] = mapped_column(Vocabulary(CreditKind, 16))
    amount_usd: Mapped[ExactUSD]
    # Consumed first: the lowest priority, then the earliest expiry, then the oldest.
    priority: Mapped[int] = mapped_column(Integer, server_default=text("1"))
    expires_at: Mapped[UTCDateTime | None]
    reference: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[UTCDateTime]
    voided_at: Mapped[UTCDateTime | None]


class TierChange(Base):
    """An account's tier history: who or what moved it, and when."""

    __tablename__ = "tier_changes"
    __table_args__ = (
        Index("ix_tier_changes_account_id", "account_id"),
        one_of("from_tier", Tier),
        one_of("to_tier", Tier),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    account_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    from_tier: Mapped[Tier] = mapped_column(Vocabulary(Tier, 16))
    to_tier: Mapped[Tier] = mapped_column(Vocabulary(Tier, 16))
    reason: Mapped[str] = mapped_column(String(200))
    changed_at: Mapped[UTCDateTime]


class ApiKey(Base):
    __tablename__ = "api_keys"
    __table_args__ = (Index("ix_api_keys_account_id", "account_id"),)

    id: Mapped[uuid.UUID] = _uuid_pk()
    account_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    name: Mapped[str | None] = mapped_column(String(200))
    # The first characters of the key: enough to recognise it in a list, useless to an attacker.
    prefix: Mapped[str] = mapped_column(String(16))
    # SHA-256 of the whole key; the plaintext is never stored.
    key_hash: Mapped[bytes] = mapped_column(LargeBinary(32), unique=True)
    monthly_budget_usd: Mapped[ExactUSD | None]
    rate_limit_rpm: Mapped[int | None] = mapped_column(Integer)
    rate_limit_tpm: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = _created_at()
    last_used_at: Mapped[UTCDateTime | None]
    revoked_at: Mapped[UTCDateTime | None]
    expires_at: Mapped[UTCDateTime | None]

    account: Mapped[Account] = relationship(back_populates="keys", lazy="raise")


class PriceVersion(Base):
    """A model's price from `effective_from` on; a later version supersedes it, never edits it."""

    __tablename__ = "price_versions"
    __table_args__ = (
        UniqueConstraint("model", "effective_from"),
        CheckConstraint(
            "input_usd_per_mtok >= 0 AND output_usd_per_mtok >= 0"
            " AND (cached_input_usd_per_mtok IS NULL OR cached_input_usd_per_mtok >= 0)",
            name="non_negative",
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    # An exact model id or a glob pattern (`meta-llama/*`).
    model: Mapped[str] = mapped_column(String(256))
    input_usd_per_mtok: Mapped[RateUSD]
    output_usd_per_mtok: Mapped[RateUSD]
    cached_input_usd_per_mtok: Mapped[RateUSD | None]
    effective_from: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    source: Mapped[str] = mapped_column(String(32), server_default="api")
    created_at: Mapped[datetime] = _created_at()


# The rates of a price, a provider cost or an explicit rate-card rate: never negative.
_NON_NEGATIVE_RATES = (
    "input_usd_per_mtok >= 0 AND output_usd_per_mtok >= 0"
    " AND (cached_input_usd_per_mtok IS NULL OR cached_input_usd_per_mtok >= 0)"
)


class ProviderCostVersion(Base):
    """What `provider` charges the operator for `model` from `effective_from` on (versioned
    like `PriceVersion`, never edited)."""

    __tablename__ = "provider_cost_versions"
    __table_args__ = (
        UniqueConstraint("provider", "model", "effective_from"),
        CheckConstraint(_NON_NEGATIVE_RATES, name="non_negative"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    provider: Mapped[str] = mapped_column(String(64))
    # An exact model id or a glob pattern.
    model: Mapped[str] = mapped_column(String(256))
    input_usd_per_mtok: Mapped[RateUSD]
    output_usd_per_mtok: Mapped[RateUSD]
    cached_input_usd_per_mtok: Mapped[RateUSD | None]
    effective_from: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    source: Mapped[str] = mapped_column(String(32), server_default="api")
    created_at: Mapped[datetime] = _created_at()


class RateCard(Base):
    """A named pricing plan; its terms are its versions."""

    __tablename__ = "rate_cards"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    description: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _created_at()


class RateCardVersion(Base):
    """A rate card's terms from `effective_from` on, until its next version (never edited)."""

    __tablename__ = "rate_card_versions"
    __table_args__ = (
        UniqueConstraint("rate_card_id", "effective_from"),
        CheckConstraint("markup_pct >= -100", name="markup_not_below_free"),
        one_of("markup_basis", MarkupBasis),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    rate_card_id: Mapped[int] = mapped_column(ForeignKey("rate_cards.id"))
    effective_from: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    markup_pct: Mapped[Decimal] = mapped_column(Numeric(9, 4))
    markup_basis: Mapped[MarkupBasis] = mapped_column(Vocabulary(MarkupBasis, 16))
    created_at: Mapped[datetime] = _created_at()


class RateCardRate(Base):
    """An explicit rate of a rate-card version for a model (exact id or glob): it wins over
    the version's markup."""

    __tablename__ = "rate_card_rates"
    __table_args__ = (
        UniqueConstraint("version_id", "model"),
        CheckConstraint(_NON_NEGATIVE_RATES, name="non_negative"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("rate_card_versions.id"))
    model: Mapped[str] = mapped_column(String(256))
    input_usd_per_mtok: Mapped[RateUSD]
    output_usd_per_mtok: Mapped[RateUSD]
    cached_input_usd_per_mtok: Mapped[RateUSD | None]


class AccountRateCard(Base):
    """From `effective_from` on, the account pays by this rate card (NULL: list prices).
    Appended, never edited: the history of an account's plans."""

    __tablename__ = "account_rate_cards"
    __table_args__ = (UniqueConstraint("account_id", "effective_from"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    account_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    rate_card_id: Mapped[int | None] = mapped_column(ForeignKey("rate_cards.id"))
    effective_from: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = _created_at()


class UsageRecord(Base):
    """One row of the append-only usage ledger: the outcome of one proxied request.

    Partitioned by month on `occurred_at` (partitions are created by
    `meterline_ensure_usage_partition`). The primary key includes the partition key, as
    Postgres requires; `occurred_at` is fixed when the record is made in memory, so a
    replay of the same record always carries the same pair and is ignored.
    """

    __tablename__ = "usage_ledger"
    __table_args__ = (
        PrimaryKeyConstraint("request_id", "occurred_at"),
        Index("ix_usage_ledger_account_occurred", "account_id", "occurred_at"),
        # The order the raw export writes and the events API pages: read, not sorted.
        Index("ix_usage_ledger_occurred_request", "occurred_at", "request_id"),
        Index(
            "ix_usage_ledger_account_task",
            "account_id",
            "task_id",
            postgresql_where=text("task_id IS NOT NULL"),
        ),
        # A B-tree, not BRIN: rows recorded since a watermark land in the free space VACUUM
        # found all over a partition, so block ranges say nothing of when rows were recorded.
        Index("ix_usage_ledger_recorded_at", "recorded_at"),
        # Rows stored without a price (or version): few, found by invoices and the
        # unpriced-usage report; all others are summed by `usage_rollup`. Partial, so priced
        # rows (nearly all) cost the ledger's ingest nothing here.
        Index(
            "ix_usage_ledger_unpriced",
            "account_id",
            "occurred_at",
            postgresql_where=text("price_version_id IS NULL OR cost_usd IS NULL"),
        ),
        # Flagged usage claims: few, found by the review report and by finalization.
        Index(
            "ix_usage_ledger_flagged",
            "account_id",
            "occurred_at",
            postgresql_where=text("usage_flag IS NOT NULL"),
        ),
        one_of("usage_source", UsageSource),
        one_of("kind", LedgerKind),
        {"postgresql_partition_by": "RANGE (occurred_at)"},
    )

    request_id: Mapped[str] = mapped_column(String(40))
    occurred_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # When the row reached Postgres (its insert, not its transaction's start): late rows
    # (replayed from the spool) are found by it. Every INSERT statement on the ledger takes
    # the ledger writers' shared advisory lock first (trigger `usage_ledger_write`), so the
    # invoice cutoff knows which open transactions may still add rows.
    recorded_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.clock_timestamp()
    )
    kind: Mapped[LedgerKind] = mapped_column(
        Vocabulary(LedgerKind, 16), server_default=LedgerKind.USAGE.value
    )
    account_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True))
    key_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    task_id: Mapped[str | None] = mapped_column(String(128))
    task_type: Mapped[str | None] = mapped_column(String(128))
    endpoint: Mapped[str] = mapped_column(String(32))
    requested_model: Mapped[str] = mapped_column(String(256))
    upstream_model: Mapped[str | None] = mapped_column(String(256))
    provider: Mapped[str | None] = mapped_column(String(64))
    stream: Mapped[bool] = mapped_column(Boolean)
    status_code: Mapped[int] = mapped_column(SmallInteger)
    error_code: Mapped[str | None] = mapped_column(String(64))
    prompt_tokens: Mapped[int] = mapped_column(TokenCount)
    completion_tokens: Mapped[int] = mapped_column(TokenCount)
    total_tokens: Mapped[int] = mapped_column(TokenCount)
    cached_tokens: Mapped[int] = mapped_column(TokenCount, server_default="0")
    reasoning_tokens: Mapped[int] = mapped_column(TokenCount, server_default="0")
    usage_source: Mapped[UsageSource] = mapped_column(Vocabulary(UsageSource, 16))
    latency_ms: Mapped[int | None] = mapped_column(Integer)
    ttft_ms: Mapped[int | None] = mapped_column(Integer)
    # Exact, unrounded; NULL when no price covered the model at `occurred_at` (unpriced).
    cost_usd: Mapped[ExactUSD | None]
    price_version_id: Mapped[int | None] = mapped_column(BigInteger)
    # What the upstream charged the operator for the row, exact; NULL when unknown (never
    # 0). With the versions both figures were computed with (NULL: none applied).
    provider_cost_usd: Mapped[ExactUSD | None]
    provider_cost_version_id: Mapped[int | None] = mapped_column(BigInteger)
    rate_card_version_id: Mapped[int | None] = mapped_column(BigInteger)
    # Set when the provider's usage claim is implausible (`service.proxy.usage`): stored as
    # claimed, but it blocks finalization until reviewed (`FlaggedUsageReview`).
    usage_flag: Mapped[str | None] = mapped_column(String(32))


class FlaggedUsageReview(Base):
    """An operator's decision on a flagged ledger row: bill it as claimed, or corrected by
    an adjustment row (`adjustment_request_id`). The ledger itself is never edited."""

    __tablename__ = "flagged_usage_reviews"
    __table_args__ = (
        PrimaryKeyConstraint("request_id", "occurred_at"),
        one_of("decision", ReviewDecision),
        Index("ix_flagged_usage_reviews_account_id", "account_id"),
    )

    request_id: Mapped[str] = mapped_column(String(40))
    occurred_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    account_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True))
    decision: Mapped[ReviewDecision] = mapped_column(Vocabulary(ReviewDecision, 16))
    adjustment_request_id: Mapped[str | None] = mapped_column(String(40))
    note: Mapped[str | None] = mapped_column(Text)
    reviewed_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )


class QuarantinedUsage(Base):
    """A ledger record Postgres refused for its content, kept byte for byte with the reason.

    The writer stores a refused batch row by row, so only the rows Postgres itself refuses
    end here; `record` is the record's JSON line (bytes: it may hold what text cannot).
    """

    __tablename__ = "usage_quarantine"
    __table_args__ = (
        one_of("source", BatchSource),
        Index("ix_usage_quarantine_quarantined_at", "quarantined_at", "request_id"),
    )

    request_id: Mapped[str] = mapped_column(Text, primary_key=True)
    account_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    occurred_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    quarantined_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    source: Mapped[BatchSource] = mapped_column(Vocabulary(BatchSource, 16))
    sqlstate: Mapped[str | None] = mapped_column(String(5))
    reason: Mapped[str] = mapped_column(Text)
    record: Mapped[bytes] = mapped_column(LargeBinary)


class Task(Base):
    """A unit of customer-visible work; quoted tasks carry a fixed price."""

    __tablename__ = "tasks"
    __table_args__ = (
        UniqueConstraint("account_id", "external_id"),
        one_of("status", TaskStatus),
        one_of("billed_as", TaskBilling, nullable=True),
        # A completed quoted task always says how it is billed.
        CheckConstraint(
            "quote_id IS NULL OR status = 'open' OR billed_as IS NOT NULL",
            name="billed_when_completed",
        ),
        Index("ix_tasks_account_completed", "account_id", "completed_at"),
        # Completed quoted tasks no finalized invoice bills yet: few, read by every invoice.
        Index(
            "ix_tasks_unbilled",
            "account_id",
            "completed_at",
            postgresql_where=text(
                "quote_id IS NOT NULL AND status <> 'open' AND billed_invoice_id IS NULL"
            ),
        ),
        # The expiry job finds the open quoted tasks past their deadline.
        Index(
            "ix_tasks_expires_at",
            "expires_at",
            postgresql_where=text("status = 'open' AND expires_at IS NOT NULL"),
        ),
        # Settling recently completed tasks finds them by completion time alone.
        Index("ix_tasks_completed_at", "completed_at"),
        # The proxy's guard reloads the open quoted tasks every few seconds.
        Index(
            "ix_tasks_open_quoted",
            "account_id",
            postgresql_where=text("status = 'open' AND quote_id IS NOT NULL"),
        ),
        # A history quote walks one cost bucket of one account's type and model in cost order.
        Index(
            "ix_tasks_cost_history",
            "account_id",
            "task_type",
            "model",
            "cost_bucket",
            "completed_cost_usd",
            postgresql_include=["completed_at"],
            postgresql_where=text("completed_cost_usd IS NOT NULL"),
        ),
    )

    id: Mapped[uuid.UUID] = _uuid_pk()
    account_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    # The `X-Task-Id` the client sends; unique within its account.
    external_id: Mapped[str] = mapped_column(String(128))
    task_type: Mapped[str | None] = mapped_column(String(128))
    model: Mapped[str | None] = mapped_column(String(256))
    quote_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("quotes.id", ondelete="RESTRICT"), unique=True
    )
    fixed_price_usd: Mapped[CentsUSD | None]
    cost_cap_usd: Mapped[ExactUSD | None]
    status: Mapped[TaskStatus] = mapped_column(
        Vocabulary(TaskStatus, 16), server_default=TaskStatus.OPEN.value
    )
    # For a quoted task: the instant its quote was accepted. It covers the requests that
    # occurred from then on; earlier ones under the same id are billed per token.
    created_at: Mapped[datetime] = _created_at()
    # An open quoted task expires here (acceptance + `task_expiry_s`) and is then billed
    # by the account's `expired_task_policy`.
    expires_at: Mapped[UTCDateTime | None]
    # Expired: the deadline, whenever the expiry ran (so it is billed in the same month).
    completed_at: Mapped[UTCDateTime | None]
    # How the completed quoted task is billed (`fixed_price`, `cost`, `free`), fixed at
    # completion from the outcome and the account's policy in force then.
    billed_as: Mapped[TaskBilling | None] = mapped_column(Vocabulary(TaskBilling, 16))
    # The finalized invoice billing the completed quoted task (cleared when it is voided):
    # a task completed after its month's invoice was finalized goes on the next one, once.
    billed_invoice_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("invoices.id", ondelete="SET NULL")
    )
    # The cutoff of the first finalized invoice that billed it, kept through voids: a task
    # billed at cost has its rows recorded up to here in its task line; each later row is
    # billed once, as late task cost, by the invoice whose usage window holds it.
    billed_rows_until: Mapped[UTCDateTime | None]
    # The task's exact ledger cost when it completed (settled again shortly after, for rows
    # still in flight then); the history that quotes learn from reads it.
    completed_cost_usd: Mapped[ExactUSD | None]
    # Logarithmic cost bucket (~6.5 % wide): lets a quote find its quantile from the rollup
    # and then walk one bucket only. Ordered like the cost; -32768 for a zero cost.
    cost_bucket: Mapped[int | None] = mapped_column(
        SmallInteger,
        Computed(
            "CASE WHEN completed_cost_usd > 0 THEN floor(ln(completed_cost_usd) * 16)::smallint"
            " WHEN completed_cost_usd IS NOT NULL THEN -32768 END",
            persisted=True,
        ),
    )


class TaskCostRollup(Base):
    """Completed tasks counted per account, type, model, UTC day and cost bucket.

    Kept by the trigger `meterline_task_cost_rollup` on `tasks`, so every writer of tasks
    keeps it right. A quote sums a few hundred of these rows instead of scanning every
    past task.
    """

    __tablename__ = "task_cost_rollup"
    __table_args__ = (
        PrimaryKeyConstraint("account_id", "task_type", "model", "completed_on", "cost_bucket"),
    )

    account_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    task_type: Mapped[str] = mapped_column(String(128))
    model: Mapped[str] = mapped_column(String(256))
    completed_on: Mapped[date] = mapped_column(Date)
    cost_bucket: Mapped[int] = mapped_column(SmallInteger)
    tasks: Mapped[int] = mapped_column(Integer)
    cost_usd: Mapped[ExactUSD]


class Quote(Base):
    """A fixed price offered in advance for one task of a type on a model."""

    __tablename__ = "quotes"
    __table_args__ = (
        one_of("basis", QuoteBasis),
        one_of("cost_source", CostSource, nullable=True),
        Index("ix_quotes_account_id", "account_id"),
    )

    id: Mapped[uuid.UUID] = _uuid_pk()
    account_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    task_type: Mapped[str] = mapped_column(String(128))
    model: Mapped[str] = mapped_column(String(256))
    basis: Mapped[QuoteBasis] = mapped_column(Vocabulary(QuoteBasis, 16))
    # An estimate's: whose cost its tokens were priced at (NULL for history quotes).
    cost_source: Mapped[CostSource | None] = mapped_column(Vocabulary(CostSource, 16))
    sample_size: Mapped[int] = mapped_column(Integer)
    confidence: Mapped[Decimal] = mapped_column(Numeric(6, 4))
    margin: Mapped[Decimal] = mapped_column(Numeric(8, 4))
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    max_completion_tokens: Mapped[int | None] = mapped_column(Integer)
    expected_cost_usd: Mapped[ExactUSD]
    quantile_cost_usd: Mapped[ExactUSD]
    price_usd: Mapped[CentsUSD]
    valid_until: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = _created_at()
    accepted_at: Mapped[UTCDateTime | None]


class Invoice(Base):
    """An account's bill for one calendar month (UTC)."""

    __tablename__ = "invoices"
    __table_args__ = (
        one_of("status", InvoiceStatus),
        # One live (draft or finalized) invoice per account and month; voided ones stay beside it.
        Index(
            "uq_invoices_account_period_live",
            "account_id",
            "period",
            unique=True,
            postgresql_where=text("status <> 'void'"),
        ),
    )

    id: Mapped[uuid.UUID] = _uuid_pk()
    # Given at finalization from a gapless sequence (`INV-2026-000123`).
    number: Mapped[str | None] = mapped_column(String(32), unique=True)
    account_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("accounts.id", ondelete="RESTRICT"))
    period: Mapped[str] = mapped_column(String(7))
    status: Mapped[InvoiceStatus] = mapped_column(
        Vocabulary(InvoiceStatus, 16), server_default=InvoiceStatus.DRAFT.value
    )
    currency: Mapped[str] = mapped_column(String(3), server_default="USD")
    total_usd: Mapped[CentsUSD] = mapped_column(server_default="0")
    # The ledger rows this invoice covers are those recorded up to this instant.
    usage_cutoff: Mapped[UTCDateTime | None]
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )
    finalized_at: Mapped[UTCDateTime | None]
    voided_at: Mapped[UTCDateTime | None]
    void_reason: Mapped[str | None] = mapped_column(Text)
    # Usage that no price covers (model, period, tokens): shown on the draft, blocks finalize.
    unpriced_usage: Mapped[list[dict[str, object]] | None] = mapped_column(JSONB)

    lines: Mapped[list[InvoiceLine]] = relationship(
        back_populates="invoice",
        lazy="raise",
        order_by="InvoiceLine.position",
        cascade="all, delete-orphan",
    )
    credit_notes: Mapped[list[CreditNote]] = relationship(
        back_populates="invoice", lazy="raise", order_by="CreditNote.number"
    )


class InvoiceLine(Base):
    __tablename__ = "invoice_lines"
    __table_args__ = (
        one_of("kind", LineKind),
        Index("ix_invoice_lines_invoice_id", "invoice_id"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    invoice_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("invoices.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)
    kind: Mapped[LineKind] = mapped_column(Vocabulary(LineKind, 16))
    description: Mapped[str] = mapped_column(Text)
    model: Mapped[str | None] = mapped_column(String(256))
    task_type: Mapped[str | None] = mapped_column(String(128))
    price_version_id: Mapped[int | None] = mapped_column(BigInteger)
    quantity: Mapped[int] = mapped_column(BigInteger)
    prompt_tokens: Mapped[int | None] = mapped_column(BigInteger)
    completion_tokens: Mapped[int | None] = mapped_column(BigInteger)
    cached_tokens: Mapped[int | None] = mapped_column(BigInteger)
    input_usd_per_mtok: Mapped[RateUSD | None]
    output_usd_per_mtok: Mapped[RateUSD | None]
    cached_input_usd_per_mtok: Mapped[RateUSD | None]
    unit_price_usd: Mapped[ExactUSD | None]
    amount_exact_usd: Mapped[ExactUSD]
    amount_usd: Mapped[CentsUSD]
    # Late usage: the period the usage belongs to (the invoice's own period otherwise).
    period: Mapped[str | None] = mapped_column(String(7))

    invoice: Mapped[Invoice] = relationship(back_populates="lines", lazy="raise")


class InvoiceUsageWindow(Base):
    """The ledger rows an invoice bills: rows of `period` recorded in (recorded_after, until].

    Only the windows of finalized invoices count as billed; the late-usage rule (see
    `pricing.invoice`) bills what no finalized window covers yet, so no row is billed twice.
    """

    __tablename__ = "invoice_usage_windows"
    __table_args__ = (Index("ix_invoice_usage_windows_invoice_id", "invoice_id"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    invoice_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("invoices.id", ondelete="CASCADE"))
    period: Mapped[str] = mapped_column(String(7))
    # NULL: from the beginning of time.
    recorded_after: Mapped[UTCDateTime | None]
    recorded_until: Mapped[UTCDateTime]


class UsageRollup(Base):
    """Priced ledger rows summed per account, usage month, kind, model, version and task.

    Holds exactly the rows with a price version and a cost recorded up to
    `usage_rollup_state.rolled_up_to`, added by a background job that reads the ledger (the
    ledger's ingest never touches it). An invoice sums these few rows plus the ledger rows
    recorded since, instead of a month of ledger rows. `task_id` is '' outside tasks.
    """

    __tablename__ = "usage_rollup"
    __table_args__ = (
        PrimaryKeyConstraint(
            "period", "account_id", "kind", "requested_model", "price_version_id", "task_id"
        ),
    )

    period: Mapped[str] = mapped_column(String(7))
    account_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True))
    kind: Mapped[str] = mapped_column(String(16))
    requested_model: Mapped[str] = mapped_column(String(256))
    price_version_id: Mapped[int] = mapped_column(BigInteger)
    task_id: Mapped[str] = mapped_column(String(128))
    requests: Mapped[int] = mapped_column(BigInteger)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger)
    completion_tokens: Mapped[int] = mapped_column(BigInteger)
    # Clamped per row to [0, prompt_tokens], as priced (`pricing.cost.countable_cached_tokens`).
    cached_tokens: Mapped[int] = mapped_column(BigInteger)
    cost_usd: Mapped[Decimal] = mapped_column(Numeric(30, 12))


class UsageRollupState(Base):
    """One row: `usage_rollup` holds the priced rows recorded up to `rolled_up_to`."""

    __tablename__ = "usage_rollup_state"
    __table_args__ = (CheckConstraint("id = 1", name="single_row"),)

    id: Mapped[int] = mapped_column(SmallInteger, primary_key=True, autoincrement=False)
    rolled_up_to: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class NumberSeries(StrEnum):
    """The documents numbered gaplessly per year: `INV-2026-000123`, `CN-2026-000007`."""

    INVOICE = "INV"
    CREDIT_NOTE = "CN"


class InvoiceNumberCounter(Base):
    """Gapless numbering of a series per year: the row is locked and bumped in the
    transaction that issues the document (an invoice finalized, a credit note issued)."""

    __tablename__ = "invoice_number_counters"
    __table_args__ = (one_of("series", NumberSeries),)

    series: Mapped[NumberSeries] = mapped_column(
        Vocabulary(NumberSeries, 8), primary_key=True, server_default=NumberSeries.INVOICE.value
    )
    year: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    last_number: Mapped[int] = mapped_column(Integer)


class UsageDaily(Base):
    """Ledger rows summed per UTC day, account, key, model, provider, task type and status.

    Holds exactly the rows recorded up to `usage_daily_state.rolled_up_to` (priced or not),
    added by a background job that only reads the ledger. Usage reports over whole UTC days
    (the console's overview, `GET /billing/usage` without a task filter) sum these rows plus
    the ledger rows recorded since, instead of every ledger row of the range. A missing key,
    provider or task type is stored as the zero UUID or '' (a key column cannot be NULL).
    """

    __tablename__ = "usage_daily"
    __table_args__ = (
        PrimaryKeyConstraint(
            "day", "account_id", "key_id", "requested_model", "provider", "task_type", "status_code"
        ),
        Index("ix_usage_daily_account_day", "account_id", "day"),
    )

    day: Mapped[date] = mapped_column(Date)
    account_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True))
    key_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True))
    requested_model: Mapped[str] = mapped_column(String(256))
    provider: Mapped[str] = mapped_column(String(64))
    task_type: Mapped[str] = mapped_column(String(128))
    status_code: Mapped[int] = mapped_column(SmallInteger)
    requests: Mapped[int] = mapped_column(BigInteger)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger)
    completion_tokens: Mapped[int] = mapped_column(BigInteger)
    total_tokens: Mapped[int] = mapped_column(BigInteger)
    cached_tokens: Mapped[int] = mapped_column(BigInteger)
    reasoning_tokens: Mapped[int] = mapped_column(BigInteger)
    # Exact sum of the priced rows; unpriced rows add nothing here and are counted apart.
    cost_usd: Mapped[Decimal] = mapped_column(Numeric(30, 12))
    unpriced_requests: Mapped[int] = mapped_column(BigInteger)


class UsageDailyState(Base):
    """One row: `usage_daily` holds the ledger rows recorded up to `rolled_up_to`."""

    __tablename__ = "usage_daily_state"
    __table_args__ = (CheckConstraint("id = 1", name="single_row"),)

    id: Mapped[int] = mapped_column(SmallInteger, primary_key=True, autoincrement=False)
    rolled_up_to: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ConsoleSession(Base):
    """A signed-in browser of the web console: the operator (admin token) or one API key.

    Only the SHA-256 of the cookie's random token is stored. An operator session remembers
    the hash of the admin token it signed in with, so rotating the token ends it; a customer
    session ends with its key (revoked, expired or deleted).
    """

    __tablename__ = "console_sessions"
    __table_args__ = (
        CheckConstraint("(key_id IS NULL) <> (admin_token_hash IS NULL)", name="operator_or_key"),
        Index("ix_console_sessions_key_id", "key_id"),
        Index("ix_console_sessions_expires_at", "expires_at"),
    )

    token_hash: Mapped[bytes] = mapped_column(LargeBinary(32), primary_key=True)
    key_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"))
    admin_token_hash: Mapped[bytes | None] = mapped_column(LargeBinary(32))
    # Sent back in every form and state-changing request of this session.
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = _created_at()
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class IngestedEvent(Base):
    """A usage event ingested as a CloudEvent (`POST /billing/events`), by its identity.

    CloudEvents are unique by (`source`, `id`); the ledger's key holds `occurred_at`, so
    this table is what makes a replayed event (even with another `time`) change nothing.
    """

    __tablename__ = "ingested_events"

    source: Mapped[str] = mapped_column(String(256), primary_key=True)
    event_id: Mapped[str] = mapped_column(String(256), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(40))  # its ledger row's
    occurred_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    ingested_at: Mapped[datetime] = _created_at()


class IdempotencyKey(Base):
    """A POST's `Idempotency-Key` in its route's scope, with what its first request answered
    (`service.idempotency`). Claimed and answered in the transaction of the work it guards."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (PrimaryKeyConstraint("scope", "key"),)

    scope: Mapped[str] = mapped_column(String(128))
    key: Mapped[str] = mapped_column(String(255))
    # SHA-256 of the request as parsed: the same key with another request is refused.
    request_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    # NULL only inside the claiming transaction, before its work has answered.
    status_code: Mapped[int | None] = mapped_column(SmallInteger)
    response: Mapped[dict[str, object] | None] = mapped_column(JSONB)
    created_at: Mapped[datetime] = _created_at()


class Adjustment(Base):
    """Why an adjustment row of the ledger was written (`service.adjustments`); its amount
    is the row's `cost_usd`, kept only there."""

    __tablename__ = "adjustments"
    __table_args__ = (Index("ix_adjustments_account_id", "account_id"),)

    request_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    occurred_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    account_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("accounts.id", ondelete="RESTRICT"))
    reason: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = _created_at()


class CreditNote(Base):
    """Money given back against a finalized invoice, which itself never changes. Numbered
    gaplessly per year (`CN-2026-000001`); together they never exceed the invoice's total."""

    __tablename__ = "credit_notes"
    __table_args__ = (
        CheckConstraint("amount_usd > 0", name="positive"),
        Index("ix_credit_notes_invoice_id", "invoice_id"),
    )

    id: Mapped[uuid.UUID] = _uuid_pk()
    number: Mapped[str] = mapped_column(String(32), unique=True)
    invoice_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("invoices.id", ondelete="RESTRICT"))
    account_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("accounts.id", ondelete="RESTRICT"))
    amount_usd: Mapped[CentsUSD]
    reason: Mapped[str] = mapped_column(Text)
    issued_at: Mapped[datetime] = _created_at()

    invoice: Mapped[Invoice] = relationship(back_populates="credit_notes", lazy="raise")
    lines: Mapped[list[CreditNoteLine]] = relationship(
        back_populates="credit_note", lazy="raise", order_by="CreditNoteLine.position"
    )


class CreditNoteLine(Base):
    """What a credit note gives back, line by line (its lines add up to its amount)."""

    __tablename__ = "credit_note_lines"
    __table_args__ = (Index("ix_credit_note_lines_credit_note_id", "credit_note_id"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    credit_note_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("credit_notes.id", ondelete="CASCADE")
    )
    position: Mapped[int] = mapped_column(Integer)
    description: Mapped[str] = mapped_column(Text)
    amount_usd: Mapped[CentsUSD]

    credit_note: Mapped[CreditNote] = relationship(back_populates="lines", lazy="raise")


class WebhookEndpoint(Base):
    """A URL that receives signed webhooks of the event types it subscribes to.

    The signing secret is kept as issued (`whsec_` + base64): each delivery is signed with
    it, so, unlike an API key, it cannot be stored as a hash. It is shown once, at creation.
    """

    __tablename__ = "webhook_endpoints"

    id: Mapped[uuid.UUID] = _uuid_pk()
    url: Mapped[str] = mapped_column(String(2048))
    description: Mapped[str | None] = mapped_column(String(500))
    events: Mapped[list[str]] = mapped_column(ARRAY(String(64)))
    secret: Mapped[str] = mapped_column(String(100))
    enabled: Mapped[bool] = mapped_column(Boolean, server_default=true())
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )


class WebhookEvent(Base):
    """The outbox: a business event, written in the transaction of the change that raised it.

    `body` is the JSON sent, byte for byte on every attempt (its signature covers it).
    `dedup_key` makes an event that must happen once (a budget threshold of a month, a
    task's cap) raised by several processes, or again after a restart, one row.
    """

    __tablename__ = "webhook_events"
    __table_args__ = (Index("ix_webhook_events_account_id", "account_id"),)

    id: Mapped[uuid.UUID] = _uuid_pk()
    type: Mapped[str] = mapped_column(String(64))
    account_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    body: Mapped[str] = mapped_column(Text)
    dedup_key: Mapped[str | None] = mapped_column(String(300), unique=True)
    created_at: Mapped[datetime] = _created_at()


class DeliveryStatus(StrEnum):
    PENDING = "pending"  # due at `next_attempt_at` (or being attempted until then)
    DELIVERED = "delivered"  # the endpoint answered 2xx
    FAILED = "failed"  # no 2xx within the retry window: given up (a retry starts over)


class WebhookDelivery(Base):
    """One event to one endpoint: the unit the sender claims, attempts and retries.

    A claimed delivery's `next_attempt_at` is pushed past the attempt's deadline, so a
    process that dies mid-attempt leaves it due again (at least once) and two processes
    never attempt it at the same time (claims take `FOR UPDATE SKIP LOCKED`).
    """

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        one_of("status", DeliveryStatus),
        UniqueConstraint("event_id", "endpoint_id"),
        Index("ix_webhook_deliveries_endpoint_id", "endpoint_id", "created_at"),
        Index(
            "ix_webhook_deliveries_due",
            "next_attempt_at",
            postgresql_where=text("status = 'pending'"),
        ),
    )

    id: Mapped[uuid.UUID] = _uuid_pk()
    event_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("webhook_events.id", ondelete="CASCADE"))
    endpoint_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("webhook_endpoints.id", ondelete="CASCADE")
    )
    status: Mapped[DeliveryStatus] = mapped_column(
        Vocabulary(DeliveryStatus, 16), server_default=DeliveryStatus.PENDING.value
    )
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    next_attempt_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    last_error: Mapped[str | None] = mapped_column(String(500))
    last_status_code: Mapped[int | None] = mapped_column(SmallInteger)
    last_attempt_at: Mapped[UTCDateTime | None]
    delivered_at: Mapped[UTCDateTime | None]
    created_at: Mapped[datetime] = _created_at()
