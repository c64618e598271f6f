"""Ingested usage events: the identity (`source`, `id`) of every CloudEvent taken in by
`POST /billing/events`, so the same event sent again adds nothing to the ledger.

Revision ID: 0010
Revises: 0006
Create Date: 2026-12-01 13:30:00+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "ingested_events",
        sa.Column("source", sa.String(length=256), nullable=False),
        sa.Column("event_id", sa.String(length=256), nullable=False),
        sa.Column("request_id", sa.String(length=40), nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "ingested_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("source", "event_id", name=op.f("pk_ingested_events")),
    )


def downgrade() -> None:
    op.drop_table("ingested_events")
