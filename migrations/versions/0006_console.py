"""Console: sign-in sessions of the web console, and a daily usage rollup for its pages.

`console_sessions` holds one row per signed-in browser (the hash of its cookie token).
`usage_daily` sums the ledger per UTC day and reporting dimension, kept by a background job
up to `usage_daily_state.rolled_up_to`, so a month of usage reads as a few thousand sums.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 09:00:00+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "usage_daily",
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("account_id", sa.UUID(), nullable=False),
        sa.Column("key_id", sa.UUID(), nullable=False),
        sa.Column("requested_model", sa.String(length=256), nullable=False),
        sa.Column("provider", sa.String(length=64), nullable=False),
        sa.Column("task_type", sa.String(length=128), nullable=False),
        sa.Column("status_code", sa.SmallInteger(), nullable=False),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger(), nullable=False),
        sa.Column("completion_tokens", sa.BigInteger(), nullable=False),
        sa.Column("total_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cached_tokens", sa.BigInteger(), nullable=False),
        sa.Column("reasoning_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cost_usd", sa.Numeric(precision=30, scale=12), nullable=False),
        sa.Column("unpriced_requests", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint(
            "day",
            "account_id",
            "key_id",
            "requested_model",
            "provider",
            "task_type",
            "status_code",
            name=op.f("pk_usage_daily"),
        ),
    )
    op.create_index("ix_usage_daily_account_day", "usage_daily", ["account_id", "day"])
    op.create_table(
        "usage_daily_state",
        sa.Column("id", sa.SmallInteger(), autoincrement=False, nullable=False),
        sa.Column("rolled_up_to", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("id = 1", name=op.f("ck_usage_daily_state_single_row")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_usage_daily_state")),
    )
    # From the beginning: the job's first round folds whatever the ledger already holds.
    op.execute(
        "INSERT INTO usage_daily_state (id, rolled_up_to) VALUES (1, '1970-01-01T00:00:00Z')"
    )
    op.create_table(
        "console_sessions",
        sa.Column("token_hash", sa.LargeBinary(length=32), nullable=False),
        sa.Column("key_id", sa.UUID(), nullable=True),
        sa.Column("admin_token_hash", sa.LargeBinary(length=32), nullable=True),
        sa.Column("csrf_token", sa.String(length=64), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "(key_id IS NULL) <> (admin_token_hash IS NULL)",
            name=op.f("ck_console_sessions_operator_or_key"),
        ),
        sa.ForeignKeyConstraint(
            ["key_id"],
            ["api_keys.id"],
            name=op.f("fk_console_sessions_key_id_api_keys"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("token_hash", name=op.f("pk_console_sessions")),
    )
    op.create_index("ix_console_sessions_key_id", "console_sessions", ["key_id"])
    op.create_index("ix_console_sessions_expires_at", "console_sessions", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_console_sessions_expires_at", table_name="console_sessions")
    op.drop_index("ix_console_sessions_key_id", table_name="console_sessions")
    op.drop_table("console_sessions")
    op.drop_table("usage_daily_state")
    op.drop_index("ix_usage_daily_account_day", table_name="usage_daily")
    op.drop_table("usage_daily")
