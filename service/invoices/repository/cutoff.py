"""The ledger's committed horizon: the latest instant up to which every row is committed."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select, text

from service.db.repository import Repository

# The ledger writers' advisory lock (migration 0003): the trigger `usage_ledger_write`
# takes it, shared, before every INSERT statement on the ledger, until that transaction ends.
LEDGER_WRITE_LOCK = (1296387148, 1)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class LedgerWriter:
    """An open transaction that has written the ledger (the oldest holds back the cutoff)."""

    pid: int
    application_name: str | None
    xact_start: datetime | None  # None: started by a role whose activity this one cannot see


class CutoffRepository(Repository):
    async def usage_cutoff(self) -> datetime:
        """The latest instant up to which every ledger row is committed.

        A row's `recorded_at` is the time of its insert, taken after its statement took the
        ledger writers' shared advisory lock (trigger `usage_ledger_write`), which its
        transaction then holds until it ends. So a row recorded before the oldest open
        transaction holding that lock began is committed, and a transaction that has not
        written yet will stamp its rows later than now: the cutoff stops just before the
        oldest open ledger-writing transaction, and other sessions (a `psql` left in BEGIN,
        a long report) never hold it back. The clock is read before the locks, so a writer
        that starts in between stamps its rows after it. A writer of another role whose
        start this role may not read (no pg_read_all_stats) stops the cutoff altogether.
        """
        clock: datetime = (await self.session.execute(select(func.clock_timestamp()))).scalar_one()
        writer = await self.oldest_ledger_writer()
        cutoff = clock
        if writer is not None:
            cutoff = min(cutoff, writer.xact_start or _EPOCH)
        return cutoff - timedelta(microseconds=1)

    async def oldest_ledger_writer(self) -> LedgerWriter | None:
        """The open transaction (other than this one) that began first among those holding
        the ledger writers' lock. Only the backend status snapshot taken first in a
        transaction is fresh, hence the clear."""
        await self.session.execute(text("SELECT pg_stat_clear_snapshot()"))
        row = (
            await self.session.execute(
                text(
                    "SELECT k.pid, a.application_name, a.xact_start FROM pg_locks k"
                    " LEFT JOIN pg_stat_activity a ON a.pid = k.pid"
                    " WHERE k.locktype = 'advisory' AND k.granted"
                    " AND k.database = (SELECT oid FROM pg_database"
                    "   WHERE datname = current_database())"
                    " AND k.classid = :lock_class AND k.objid = :lock_id AND k.objsubid = 2"
                    " AND k.pid <> pg_backend_pid()"
                    " ORDER BY a.xact_start NULLS FIRST LIMIT 1"
                ),
                {"lock_class": LEDGER_WRITE_LOCK[0], "lock_id": LEDGER_WRITE_LOCK[1]},
            )
        ).first()
        if row is None:
            return None
        return LedgerWriter(row.pid, row.application_name, row.xact_start)
