"""The ledger's `recorded_at` index becomes a B-tree: the rows recorded since a watermark
(the rollups' folds, the console's unfolded tail, invoices' late rows) are found as they
are, wherever they were stored.

A BRIN index only skips a block range while every row in it is older: once VACUUM has
recorded the free space left at the end of each page, new rows land in those gaps all
over the partition, every range then spans the newest instant, and each read of the
newest rows scanned the whole month (a 20,000-row tail cost a scan of 1,000,000 rows).

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-01 16:45:00+00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_index("ix_usage_ledger_recorded_at", table_name="usage_ledger", postgresql_using="brin")
    op.create_index("ix_usage_ledger_recorded_at", "usage_ledger", ["recorded_at"])


def downgrade() -> None:
    op.drop_index("ix_usage_ledger_recorded_at", table_name="usage_ledger")
    op.create_index(
        "ix_usage_ledger_recorded_at", "usage_ledger", ["recorded_at"], postgresql_using="brin"
    )
