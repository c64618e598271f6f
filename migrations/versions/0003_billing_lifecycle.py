"""Billing lifecycle: quoted-task expiry, the billing fixed at completion, ledger writers.

- `tasks.expires_at`: an open quoted task expires at this instant (its acceptance plus
  `METERLINE_TASK_EXPIRY_S`, fixed when the quote is accepted; open tasks accepted before
  this migration get the default of 7 days). Status `expired` joins `succeeded`/`failed`.
- `tasks.billed_as`: how a completed quoted task is billed (`fixed_price`, `cost`, `free`),
  fixed at completion from its outcome and the account's policy then; a later change of
  the account's policy never re-bills it. Completed tasks are backfilled from the
  account's current policy, the best record there is of it.
- `accounts.expired_task_policy`: how an expired task is billed (default `fixed_price`).
- `tasks.billed_invoice_id`: the finalized invoice that bills the completed quoted task
  (cleared when that invoice is voided), so a task completed after its month's invoice was
  finalized goes on the next one, once. `tasks.billed_rows_until`: the cutoff of its first
  finalized invoice, kept through voids: a task billed at cost has the rows recorded up to
  it in its task line, and each later row is billed once, as late task cost.
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
            "expired_task_policy",
            sa.String(length=16),
            server_default="fixed_price",
            nullable=False,
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
    # A completed quoted task always says how it is billed.
    op.create_check_constraint(
        op.f("ck_tasks_billed_when_completed"),
        "tasks",
        "quote_id IS NULL OR status = 'open' OR billed_as IS NOT NULL",
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
    op.add_column("tasks", sa.Column("billed_invoice_id", sa.UUID(), nullable=True))
    op.add_column(
        "tasks", sa.Column("billed_rows_until", sa.DateTime(timezone=True), nullable=True)
    )
    op.create_foreign_key(
        op.f("fk_tasks_billed_invoice_id_invoices"),
        "tasks",
        "invoices",
        ["billed_invoice_id"],
        ["id"],
        ondelete="SET NULL",
    )
    # Quoted tasks completed before this revision were billed by their month's finalized
    # invoice if they completed before it was finalized (with the rows up to its cutoff);
    # the others were billed by none, and go on the next invoice.
    op.execute(
        "UPDATE tasks t SET billed_invoice_id = i.id, billed_rows_until = i.usage_cutoff"
        " FROM invoices i WHERE i.account_id = t.account_id AND i.status = 'finalized'"
        " AND i.period = to_char(t.completed_at AT TIME ZONE 'UTC', 'YYYY-MM')"
        " AND t.completed_at <= i.finalized_at"
        " AND t.quote_id IS NOT NULL AND t.status <> 'open'"
    )
    op.create_index(
        "ix_tasks_unbilled",
        "tasks",
        ["account_id", "completed_at"],
        unique=False,
        postgresql_where=sa.text(
            "quote_id IS NOT NULL AND status <> 'open' AND billed_invoice_id IS NULL"
        ),
    )

    op.alter_column("usage_ledger", "recorded_at", server_default=sa.text("clock_timestamp()"))
    op.execute(LEDGER_WRITE_FUNCTION)
    op.execute(LEDGER_WRITE_TRIGGER)


def downgrade() -> None:
    op.execute("DROP TRIGGER IF EXISTS usage_ledger_write ON usage_ledger")
    op.execute("DROP FUNCTION IF EXISTS meterline_ledger_write()")
    op.alter_column("usage_ledger", "recorded_at", server_default=sa.text("now()"))

    op.drop_index(
        "ix_tasks_unbilled",
        table_name="tasks",
        postgresql_where=sa.text(
            "quote_id IS NOT NULL AND status <> 'open' AND billed_invoice_id IS NULL"
        ),
    )
    op.drop_constraint(op.f("fk_tasks_billed_invoice_id_invoices"), "tasks", type_="foreignkey")
    op.drop_column("tasks", "billed_rows_until")
    op.drop_column("tasks", "billed_invoice_id")
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
    op.drop_constraint(op.f("ck_tasks_billed_when_completed"), "tasks", type_="check")
    op.drop_constraint(op.f("ck_tasks_billed_as"), "tasks", type_="check")
    op.drop_constraint(op.f("ck_tasks_status"), "tasks", type_="check")
    op.create_check_constraint(
        op.f("ck_tasks_status"), "tasks", "status IN ('open', 'succeeded', 'failed')"
    )
    op.drop_column("tasks", "billed_as")
    op.drop_column("tasks", "expires_at")

    op.drop_constraint(op.f("ck_accounts_expired_task_policy"), "accounts", type_="check")
    op.drop_column("accounts", "expired_task_policy")
