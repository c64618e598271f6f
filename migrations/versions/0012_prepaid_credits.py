"""Prepaid credits: an account's billing mode, its credit grants, and its tier history.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-01 16:30:00+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "accounts",
        sa.Column("billing_mode", sa.String(length=16), server_default="postpaid", nullable=False),
    )
    op.create_check_constraint(
        op.f("ck_accounts_billing_mode"), "accounts", "billing_mode IN ('postpaid', 'prepaid')"
    )
    op.create_table(
        "credit_grants",
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("account_id", sa.UUID(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("amount_usd", sa.Numeric(precision=24, scale=12), nullable=False),
        sa.Column("priority", sa.Integer(), server_default=sa.text("1"), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("reference", sa.String(length=200), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("voided_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("amount_usd > 0", name=op.f("ck_credit_grants_amount_positive")),
        sa.CheckConstraint("kind IN ('purchase', 'grant')", name=op.f("ck_credit_grants_kind")),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["accounts.id"],
            name=op.f("fk_credit_grants_account_id_accounts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_credit_grants")),
    )
    op.create_index("ix_credit_grants_account_id", "credit_grants", ["account_id"])
    op.create_table(
        "tier_changes",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("account_id", sa.UUID(), nullable=False),
        sa.Column("from_tier", sa.String(length=16), nullable=False),
        sa.Column("to_tier", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.String(length=200), nullable=False),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "from_tier IN ('basic', 'pro', 'custom')", name=op.f("ck_tier_changes_from_tier")
        ),
        sa.CheckConstraint(
            "to_tier IN ('basic', 'pro', 'custom')", name=op.f("ck_tier_changes_to_tier")
        ),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["accounts.id"],
            name=op.f("fk_tier_changes_account_id_accounts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tier_changes")),
    )
    op.create_index("ix_tier_changes_account_id", "tier_changes", ["account_id"])
    _line_kinds("'tokens', 'task', 'late_usage', 'late_task', 'adjustment', 'credits_applied'")


def _line_kinds(values: str) -> None:
    op.drop_constraint(op.f("ck_invoice_lines_kind"), "invoice_lines", type_="check")
    op.create_check_constraint(
        op.f("ck_invoice_lines_kind"), "invoice_lines", f"kind IN ({values})"
    )


def downgrade() -> None:
    _line_kinds("'tokens', 'task', 'late_usage', 'late_task', 'adjustment'")
    op.drop_index("ix_tier_changes_account_id", table_name="tier_changes")
    op.drop_table("tier_changes")
    op.drop_index("ix_credit_grants_account_id", table_name="credit_grants")
    op.drop_table("credit_grants")
    op.drop_constraint(op.f("ck_accounts_billing_mode"), "accounts", type_="check")
    op.drop_column("accounts", "billing_mode")
