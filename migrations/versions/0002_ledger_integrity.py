"""Ledger integrity: UTC partition bounds, bigint token counts, quarantined rows, flagged usage.

- `meterline_ensure_usage_partition` added `interval '1 month'` to a `timestamptz`, which
  Postgres does in the session's TimeZone: on a database whose zone is not UTC, months got
  bounds that left gaps (America/New_York: March 29-31 had no partition) or overlapped
  (Europe/Berlin: November could not be created). The bounds are now computed on UTC wall
  clock `timestamp`s and written as UTC literals. Partitions an earlier version made with
  other bounds are detached, their rows moved into correctly bounded ones, and dropped.
- The ledger's token counts become `bigint`: providers report counts of 2³¹ and more, and
  one such row used to make Postgres refuse its whole batch. This rewrites the ledger.
- `usage_flag`: usage claims stored as the provider reported them but implausible (more
  completion tokens than the request allowed, or past any sane count); they block
  finalization until reviewed in `flagged_usage_reviews` (the ledger stays append-only).
- `usage_quarantine`: rows Postgres refused for their content, one by one, with the reason,
  so that no neighbour of a bad row is ever refused with it.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 09:00:00+00:00
"""

import re
from collections.abc import Sequence
from datetime import datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TOKEN_COLUMNS = (
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",
    "reasoning_tokens",
)

# Month arithmetic on `timestamp` (no zone) is calendar arithmetic: UTC in, UTC out,
# whatever the session's TimeZone. The bounds are written as explicit UTC literals, so
# neither TimeZone nor DateStyle can change how they are read back.
ENSURE_PARTITION_UTC = """
CREATE OR REPLACE FUNCTION meterline_ensure_usage_partition(at timestamptz)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    month_start timestamp := date_trunc('month', at AT TIME ZONE 'UTC');
    name text := 'usage_ledger_p' || to_char(month_start, 'YYYYMM');
BEGIN
    IF to_regclass(name) IS NULL THEN
        PERFORM pg_advisory_xact_lock(hashtext('meterline_usage_partition'));
        EXECUTE format(
            'CREATE TABLE IF NOT EXISTS %I PARTITION OF usage_ledger FOR VALUES FROM (%L) TO (%L)',
            name,
            to_char(month_start, 'YYYY-MM-DD HH24:MI:SS') || '+00',
            to_char(month_start + interval '1 month', 'YYYY-MM-DD HH24:MI:SS') || '+00');
    END IF;
    RETURN name;
END $$;
"""

# The definition of 0001, restored by a downgrade.
ENSURE_PARTITION_0001 = """
CREATE OR REPLACE FUNCTION meterline_ensure_usage_partition(at timestamptz)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    month_start timestamptz := date_trunc('month', at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    name text := 'usage_ledger_p' || to_char(month_start AT TIME ZONE 'UTC', 'YYYYMM');
BEGIN
    IF to_regclass(name) IS NULL THEN
        PERFORM pg_advisory_xact_lock(hashtext('meterline_usage_partition'));
        EXECUTE format(
            'CREATE TABLE IF NOT EXISTS %I PARTITION OF usage_ledger FOR VALUES FROM (%L) TO (%L)',
            name, month_start, month_start + interval '1 month');
    END IF;
    RETURN name;
END $$;
"""

_PARTITION_NAME = re.compile(r"^usage_ledger_p(\d{4})(\d{2})$")


def _expected_bound(name: str) -> str | None:
    """`FOR VALUES …` of a monthly partition, as Postgres prints it in UTC with ISO dates."""
    match = _PARTITION_NAME.match(name)
    if match is None:
        return None
    year, month = int(match[1]), int(match[2])
    start = datetime(year, month, 1)
    end = datetime(year + month // 12, month % 12 + 1, 1)
    return f"FOR VALUES FROM ('{start:%Y-%m-%d %H:%M:%S}+00') TO ('{end:%Y-%m-%d %H:%M:%S}+00')"


def _repair_partitions() -> None:
    """Give every monthly partition its UTC month; rows of a wrong one are moved, none lost."""
    bind = op.get_bind()
    # Bounds are read back as text: in UTC and ISO, whatever this session's settings were.
    saved = bind.execute(
        sa.text("SELECT current_setting('TimeZone'), current_setting('DateStyle')")
    ).one()
    bind.execute(sa.text("SELECT set_config('TimeZone', 'UTC', true)"))
    bind.execute(sa.text("SELECT set_config('DateStyle', 'ISO, YMD', true)"))
    bind.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext('meterline_usage_partition'))"))
    partitions = bind.execute(
        sa.text(
            "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i"
            " JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = 'usage_ledger'::regclass ORDER BY c.relname"
        )
    ).all()
    wrong = [name for name, bound in partitions if _expected_bound(name) not in (None, bound)]
    # Every wrong one is detached before any is recreated: their ranges may overlap.
    for name in wrong:
        bind.execute(sa.text(f'ALTER TABLE usage_ledger DETACH PARTITION "{name}"'))
        bind.execute(sa.text(f'ALTER TABLE "{name}" RENAME TO "{name}_misbounded"'))
    columns = ", ".join(
        bind.execute(
            sa.text(
                "SELECT quote_ident(attname) FROM pg_attribute WHERE attrelid ="
                " 'usage_ledger'::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum"
            )
        ).scalars()
    )
    for name in wrong:
        old = f'"{name}_misbounded"'
        bind.execute(
            sa.text(
                "SELECT meterline_ensure_usage_partition(m) FROM (SELECT DISTINCT"
                f" date_trunc('month', occurred_at) AS m FROM {old}) months"
            )
        )
        bind.execute(sa.text(f"INSERT INTO usage_ledger ({columns}) SELECT {columns} FROM {old}"))
        bind.execute(sa.text(f"DROP TABLE {old}"))
    for name in wrong:
        match = _PARTITION_NAME.match(name)
        assert match is not None
        bind.execute(
            sa.text(
                "SELECT meterline_ensure_usage_partition(make_timestamptz(:y, :m, 1, 0, 0, 0))"
            ),
            {"y": int(match[1]), "m": int(match[2])},
        )
    bind.execute(
        sa.text(
            "SELECT set_config('TimeZone', :zone, true), set_config('DateStyle', :style, true)"
        ),
        {"zone": saved[0], "style": saved[1]},
    )


def upgrade() -> None:
    op.execute(ENSURE_PARTITION_UTC)
    _repair_partitions()

    # One statement, so the ledger is rewritten once rather than once per column.
    op.execute(
        "ALTER TABLE usage_ledger "
        + ", ".join(f"ALTER COLUMN {c} TYPE bigint" for c in TOKEN_COLUMNS)
    )

    op.add_column("usage_ledger", sa.Column("usage_flag", sa.String(length=32), nullable=True))
    op.create_index(
        "ix_usage_ledger_flagged",
        "usage_ledger",
        ["account_id", "occurred_at"],
        unique=False,
        postgresql_where=sa.text("usage_flag IS NOT NULL"),
    )
    op.create_table(
        "flagged_usage_reviews",
        sa.Column("request_id", sa.String(length=40), nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("account_id", sa.UUID(), nullable=False),
        sa.Column("decision", sa.String(length=16), nullable=False),
        sa.Column("adjustment_request_id", sa.String(length=40), nullable=True),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column(
            "reviewed_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "decision IN ('accepted', 'adjusted')", name=op.f("ck_flagged_usage_reviews_decision")
        ),
        sa.PrimaryKeyConstraint("request_id", "occurred_at", name=op.f("pk_flagged_usage_reviews")),
    )
    op.create_index(
        "ix_flagged_usage_reviews_account_id", "flagged_usage_reviews", ["account_id"], unique=False
    )
    op.create_table(
        "usage_quarantine",
        sa.Column("request_id", sa.Text(), nullable=False),
        sa.Column("account_id", sa.UUID(), nullable=True),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "quarantined_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("sqlstate", sa.String(length=5), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("record", sa.LargeBinary(), nullable=False),
        sa.CheckConstraint("source IN ('live', 'replay')", name=op.f("ck_usage_quarantine_source")),
        sa.PrimaryKeyConstraint("request_id", name=op.f("pk_usage_quarantine")),
    )
    op.create_index(
        "ix_usage_quarantine_quarantined_at",
        "usage_quarantine",
        ["quarantined_at", "request_id"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index("ix_usage_quarantine_quarantined_at", table_name="usage_quarantine")
    op.drop_table("usage_quarantine")
    op.drop_index("ix_flagged_usage_reviews_account_id", table_name="flagged_usage_reviews")
    op.drop_table("flagged_usage_reviews")
    op.drop_index(
        "ix_usage_ledger_flagged",
        table_name="usage_ledger",
        postgresql_where=sa.text("usage_flag IS NOT NULL"),
    )
    op.drop_column("usage_ledger", "usage_flag")
    # Fails, rather than truncating, if a count no longer fits in an integer.
    op.execute(
        "ALTER TABLE usage_ledger "
        + ", ".join(f"ALTER COLUMN {c} TYPE integer" for c in TOKEN_COLUMNS)
    )
    # Partitions keep their (UTC) bounds; only the function goes back.
    op.execute(ENSURE_PARTITION_0001)
