"""Provider costs, rate cards and their assignment to accounts; each ledger row gains what
the upstream charged (`provider_cost_usd`) and the versions its two figures came from.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-01 16:00:00+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NON_NEGATIVE = (
    "input_usd_per_mtok >= 0 AND output_usd_per_mtok >= 0"
    " AND (cached_input_usd_per_mtok IS NULL OR cached_input_usd_per_mtok >= 0)"
)


def _rates() -> list[sa.Column[object]]:
    return [
        sa.Column("input_usd_per_mtok", sa.Numeric(18, 6), nullable=False),
        sa.Column("output_usd_per_mtok", sa.Numeric(18, 6), nullable=False),
        sa.Column("cached_input_usd_per_mtok", sa.Numeric(18, 6), nullable=True),
    ]


def _created_at() -> sa.Column[object]:
    return sa.Column(
        "created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
    )


def upgrade() -> None:
    op.create_table(
        "provider_cost_versions",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("provider", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=256), nullable=False),
        *_rates(),
        sa.Column("effective_from", sa.DateTime(timezone=True), nullable=False),
        sa.Column("source", sa.String(length=32), server_default="api", nullable=False),
        _created_at(),
        sa.CheckConstraint(NON_NEGATIVE, name=op.f("ck_provider_cost_versions_non_negative")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_provider_cost_versions")),
        sa.UniqueConstraint(
            "provider",
            "model",
            "effective_from",
            name=op.f("uq_provider_cost_versions_provider_model_effective_from"),
        ),
    )
    op.create_table(
        "rate_cards",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        _created_at(),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rate_cards")),
        sa.UniqueConstraint("name", name=op.f("uq_rate_cards_name")),
    )
    op.create_table(
        "rate_card_versions",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("rate_card_id", sa.BigInteger(), nullable=False),
        sa.Column("effective_from", sa.DateTime(timezone=True), nullable=False),
        sa.Column("markup_pct", sa.Numeric(9, 4), nullable=False),
        sa.Column("markup_basis", sa.String(length=16), nullable=False),
        _created_at(),
        sa.CheckConstraint(
            "markup_pct >= -100", name=op.f("ck_rate_card_versions_markup_not_below_free")
        ),
        sa.CheckConstraint(
            "markup_basis IN ('provider_cost', 'list_price')",
            name=op.f("ck_rate_card_versions_markup_basis"),
        ),
        sa.ForeignKeyConstraint(
            ["rate_card_id"],
            ["rate_cards.id"],
            name=op.f("fk_rate_card_versions_rate_card_id_rate_cards"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rate_card_versions")),
        sa.UniqueConstraint(
            "rate_card_id",
            "effective_from",
            name=op.f("uq_rate_card_versions_rate_card_id_effective_from"),
        ),
    )
    op.create_table(
        "rate_card_rates",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("version_id", sa.BigInteger(), nullable=False),
        sa.Column("model", sa.String(length=256), nullable=False),
        *_rates(),
        sa.CheckConstraint(NON_NEGATIVE, name=op.f("ck_rate_card_rates_non_negative")),
        sa.ForeignKeyConstraint(
            ["version_id"],
            ["rate_card_versions.id"],
            name=op.f("fk_rate_card_rates_version_id_rate_card_versions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rate_card_rates")),
        sa.UniqueConstraint(
            "version_id", "model", name=op.f("uq_rate_card_rates_version_id_model")
        ),
    )
    op.create_table(
        "account_rate_cards",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("account_id", sa.UUID(), nullable=False),
        sa.Column("rate_card_id", sa.BigInteger(), nullable=True),
        sa.Column("effective_from", sa.DateTime(timezone=True), nullable=False),
        _created_at(),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["accounts.id"],
            name=op.f("fk_account_rate_cards_account_id_accounts"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["rate_card_id"],
            ["rate_cards.id"],
            name=op.f("fk_account_rate_cards_rate_card_id_rate_cards"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_account_rate_cards")),
        sa.UniqueConstraint(
            "account_id",
            "effective_from",
            name=op.f("uq_account_rate_cards_account_id_effective_from"),
        ),
    )
    # Nullable columns without a default: adding them rewrites nothing, on any partition.
    op.add_column("usage_ledger", sa.Column("provider_cost_usd", sa.Numeric(24, 12)))
    op.add_column("usage_ledger", sa.Column("provider_cost_version_id", sa.BigInteger()))
    op.add_column("usage_ledger", sa.Column("rate_card_version_id", sa.BigInteger()))
    op.add_column("quotes", sa.Column("cost_source", sa.String(length=16)))
    op.create_check_constraint(
        op.f("ck_quotes_cost_source"),
        "quotes",
        "cost_source IS NULL OR cost_source IN ('provider_cost', 'list_price')",
    )


def downgrade() -> None:
    op.drop_constraint(op.f("ck_quotes_cost_source"), "quotes", type_="check")
    op.drop_column("quotes", "cost_source")
    op.drop_column("usage_ledger", "rate_card_version_id")
    op.drop_column("usage_ledger", "provider_cost_version_id")
    op.drop_column("usage_ledger", "provider_cost_usd")
    op.drop_table("account_rate_cards")
    op.drop_table("rate_card_rates")
    op.drop_table("rate_card_versions")
    op.drop_table("rate_cards")
    op.drop_table("provider_cost_versions")
