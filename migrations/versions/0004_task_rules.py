"""Task rules: who may report a task's outcome.

By default only the operator (the admin token) completes tasks, since the outcome decides
what a quoted task is billed; `accounts.customer_reported_outcomes` lets an account's own
keys report it too. (That a quote binds its model and covers requests from its acceptance
on needs no schema: the task row already holds its model, and its `created_at` is the
acceptance.)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 09:00:00+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "accounts",
        sa.Column(
            "customer_reported_outcomes",
            sa.Boolean(),
            server_default=sa.false(),
            nullable=False,
        ),
    )


def downgrade() -> None:
    op.drop_column("accounts", "customer_reported_outcomes")
