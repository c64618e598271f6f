"""An account's low-balance threshold: a prepaid account whose balance falls below it gets
one `credits.low` webhook event (null: none).

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-01 19:15:00+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "accounts",
        sa.Column("low_balance_threshold_usd", sa.Numeric(precision=24, scale=12), nullable=True),
    )


def downgrade() -> None:
    op.drop_column("accounts", "low_balance_threshold_usd")
