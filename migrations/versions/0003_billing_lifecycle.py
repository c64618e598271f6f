"""Billing lifecycle: quoted-task expiry, the billing fixed at completion, ledger writers.

- `tasks.expires_at`: an open quoted task expires at this instant (its acceptance plus
  `METERLINE_TASK_EXPIRY_S`, fixed when the quote is accepted; open tasks accepted before
  this migration get the default of 7 days). Status `expired` joins `succeeded`/`failed`.
- `tasks.billed_as`: how a completed quoted task is billed (`fixed_price`, `cost`, `free`),
  fixed at completion from its outcome and the account's policy then; a later change of
  the account's policy never re-bills it. Completed tasks are backfilled from the
  account's current policy, the best record there is of it.
- `accounts.expired_task_policy`: how an expired task is billed (default `fixed_price`).
- `invoice_tasks`: the quoted tasks an invoice bills; as with usage windows, only a
  finalized invoice's rows count as billed. `rows_recorded_until` is the cutoff up to which
  the task's rows are in its task line (tasks billed at cost).
- Invoice line kind `late_task`: a task of an earlier, already finalized month, or rows of
  a task billed at cost that reached the ledger after it was billed.
- Ledger writers are identifiable: every statement inserting into `usage_ledger` first takes
  a shared transaction-level advisory lock, so the invoice cutoff waits only for the
  transactions that hold it (an idle session elsewhere no longer holds back the cutoff).
  `recorded_at` becomes the row's insert time (`clock_timestamp()`, taken after the lock)
  instead of its transaction's start, so a transaction that writes later never stamps rows
  behind a cutoff already taken.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 09:00:00+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The two int4 keys of the ledger writers' advisory lock: service/invoices/repository.py
# reads its holders from pg_locks (classid, objid).
LEDGER_WRITE_LOCK = (1296387148, 1)

LEDGER_WRITE_FUNCTION = f"""
CREATE OR REPLACE FUNCTION meterline_ledger_write() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared({LEDGER_WRITE_LOCK[0]}, {LEDGER_WRITE_LOCK[1]});
    RETURN NULL;
END $$;
"""
LEDGER_WRITE_TRIGGER = """
CREATE TRIGGER usage_ledger_write BEFORE INSERT ON usage_ledger
FOR EACH STATEMENT EXECUTE FUNCTION meterline_ledger_write();
"""


def upgrade() -> None:
    op.add_column(
        "accounts",
        sa.Column(
            "expired_task_policy", sa.String(length=16), server_default="fixed_price", nullable=False
        ),
    )
    op.create_check_constraint(
        op.f("ck_accounts_expired_task_policy"),
        "accounts",
        "expired_task_policy IN ('fixed_price', 'cost', 'free')",
    )

    op.add_column("tasks", sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("tasks", sa.Column("billed_as", sa.String(length=16), nullable=True))
    op.drop_constraint(op.f("ck_tasks_status"), "tasks", type_="check")
    op.create_check_constraint(
        op.f("ck_tasks_status"), "tasks", "status IN ('open', 'succeeded', 'failed', 'expired')"
    )
    op.create_check_constraint(
        op.f("ck_tasks_billed_as"),
        "tasks",
        "billed_as IS NULL OR billed_as IN ('fixed_price', 'cost', 'free')",
    )
    op.execute(
        "UPDATE tasks SET expires_at = created_at + interval '7 days'"
        " WHERE quote_id IS NOT NULL AND status = 'open'"
    )
    op.execute(
        "UPDATE tasks t SET billed_as = CASE WHEN t.status = 'succeeded' THEN 'fixed_price'"
        " WHEN a.failed_task_policy = 'cost' THEN 'cost' ELSE 'free' END"
        " FROM accounts a WHERE a.id = t.account_id AND t.quote_id IS NOT NULL"
        " AND t.status IN ('succeeded', 'failed')"
    )
    op.create_index(
        "ix_tasks_expires_at",
        "tasks",
        ["expires_at"],
        unique=False,
        postgresql_where=sa.text("status = 'open' AND expires_at IS NOT NULL"),
    )

    op.drop_constraint(op.f("ck_invoice_lines_kind"), "invoice_lines", type_="check")
    op.create_check_constraint(
        op.f("ck_invoice_lines_kind"),
        "invoice_lines",
        "kind IN ('tokens', 'task', 'late_usage', 'late_task', 'adjustment')",
    )
    op.create_table(
        "invoice_tasks",
        sa.Column("invoice_id", sa.UUID(), nullable=False),
        sa.Column("task_id", sa.UUID(), nullable=False),
        sa.Column("rows_recorded_until", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["invoice_id"],
            ["invoices.id"],
            name=op.f("fk_invoice_tasks_invoice_id_invoices"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["task_id"],
            ["tasks.id"],
            name=op.f("fk_invoice_tasks_task_id_tasks"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("invoice_id", "task_id", name=op.f("pk_invoice_tasks")),
    )
    op.create_index("ix_invoice_tasks_task_id", "invoice_tasks", ["task_id"], unique=False)

    op.alter_column("usage_ledger", "recorded_at", server_default=sa.text("clock_timestamp()"))
    op.execute(LEDGER_WRITE_FUNCTION)
    op.execute(LEDGER_WRITE_TRIGGER)


def downgrade() -> None:
    op.execute("DROP TRIGGER IF EXISTS usage_ledger_write ON usage_ledger")
    op.execute("DROP FUNCTION IF EXISTS meterline_ledger_write()")
    op.alter_column("usage_ledger", "recorded_at", server_default=sa.text("now()"))

    op.drop_index("ix_invoice_tasks_task_id", table_name="invoice_tasks")
    op.drop_table("invoice_tasks")
    op.execute("UPDATE invoice_lines SET kind = 'task' WHERE kind = 'late_task'")
    op.drop_constraint(op.f("ck_invoice_lines_kind"), "invoice_lines", type_="check")
    op.create_check_constraint(
        op.f("ck_invoice_lines_kind"),
        "invoice_lines",
        "kind IN ('tokens', 'task', 'late_usage', 'adjustment')",
    )

    op.drop_index(
        "ix_tasks_expires_at",
        table_name="tasks",
        postgresql_where=sa.text("status = 'open' AND expires_at IS NOT NULL"),
    )
    # An expired task had no outcome before this revision: it is open again.
    op.execute("UPDATE tasks SET status = 'open', completed_at = NULL WHERE status = 'expired'")
    op.drop_constraint(op.f("ck_tasks_billed_as"), "tasks", type_="check")
    op.drop_constraint(op.f("ck_tasks_status"), "tasks", type_="check")
    op.create_check_constraint(
        op.f("ck_tasks_status"), "tasks", "status IN ('open', 'succeeded', 'failed')"
    )
    op.drop_column("tasks", "billed_as")
    op.drop_column("tasks", "expires_at")

    op.drop_constraint(op.f("ck_accounts_expired_task_policy"), "accounts", type_="check")
    op.drop_column("accounts", "expired_task_policy")
