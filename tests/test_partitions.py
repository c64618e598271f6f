"""Monthly ledger partitions are UTC months whatever the database's TimeZone.

Each test builds a database of its own whose default zone is not UTC
(`ALTER DATABASE … SET timezone`), so every session the migrations, the writer and these
checks open runs in that zone, as on a server configured that way.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from pricing.invoice import BillingPeriod
from service.db.migrate import upgrade
from tests.conftest import _with_database
from tests.support import Database

ZONES = ["America/New_York", "Europe/Berlin", "Asia/Kolkata", "Pacific/Chatham"]
YEAR = 2027


@pytest.fixture
def zoned_database(postgres_server: str, request: pytest.FixtureRequest) -> Iterator[Database]:
    zone: str = request.param
    admin = Database(postgres_server)
    name = f"meterline_tz_{secrets.token_hex(4)}"
    admin.execute(f'CREATE DATABASE "{name}"')
    admin.execute(f"ALTER DATABASE \"{name}\" SET timezone = '{zone}'")
    try:
        yield Database(_with_database(postgres_server, name))
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def edges(year: int) -> list[datetime]:
    """Instants at every month's start and end: the first and last microsecond of each
    month, and the last hours of its last days (where a zone offset used to cut)."""
    instants = []
    for k in range(12):
        month = BillingPeriod(year, k + 1)
        start, end = month.start, month.end
        instants += [start, start + timedelta(hours=1), end - timedelta(microseconds=1)]
        instants += [end - timedelta(days=d, hours=1) for d in range(4)]
    return sorted(instants)


def insert_rows(db: Database, account_id: uuid.UUID, *instants: datetime) -> None:
    """Ledger rows at these instants (one statement), with the columns every schema has."""
    db.execute(
        "INSERT INTO usage_ledger (request_id, occurred_at, account_id, endpoint,"
        " requested_model, stream, status_code, prompt_tokens, completion_tokens,"
        " total_tokens, usage_source) SELECT 'req_' || md5(random()::text), at, $2, 'chat',"
        " 'mock-chat', false, 200, 1, 1, 2, 'upstream' FROM unnest($1::timestamptz[]) at",
        list(instants),
        account_id,
    )


def partition_bounds(db: Database) -> dict[str, tuple[datetime, datetime]]:
    """Each partition's [from, to), read as instants (the bound literals carry an offset)."""
    rows = db.fetch(
        "SELECT c.relname AS name, b[1]::timestamptz AS low, b[2]::timestamptz AS high"
        " FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid,"
        " regexp_match(pg_get_expr(c.relpartbound, c.oid),"
        " 'FROM \\(''(.*)''\\) TO \\(''(.*)''\\)') b"
        " WHERE i.inhparent = 'usage_ledger'::regclass"
    )
    return {r["name"]: (r["low"], r["high"]) for r in rows}


def assert_utc_months(db: Database) -> None:
    for name, (low, high) in partition_bounds(db).items():
        month = BillingPeriod(int(name[-6:-2]), int(name[-2:]))
        assert (low, high) == (month.start, month.end), name


def rows_by_partition(db: Database, account_id: uuid.UUID) -> list[tuple[datetime, str]]:
    rows = db.fetch(
        "SELECT occurred_at, tableoid::regclass::text AS partition FROM usage_ledger"
        " WHERE account_id = $1 ORDER BY occurred_at",
        account_id,
    )
    return [(r["occurred_at"], r["partition"]) for r in rows]


def expected_partition(at: datetime) -> str:
    return f"usage_ledger_p{BillingPeriod.of(at).start:%Y%m}"


@pytest.mark.parametrize("zoned_database", ZONES, indirect=True)
def test_every_month_of_a_year_is_its_utc_month_in_any_database_zone(
    zoned_database: Database,
) -> None:
    db = zoned_database
    upgrade(db.url)
    for k in range(13):  # January to the next January: December's end meets a new year
        db.execute(
            "SELECT meterline_ensure_usage_partition($1)",
            BillingPeriod(YEAR, 1).shifted(k).start,
        )
    assert_utc_months(db)
    account_id = uuid.uuid4()
    instants = edges(YEAR)
    insert_rows(db, account_id, *instants)
    assert rows_by_partition(db, account_id) == [(at, expected_partition(at)) for at in instants]


@pytest.mark.parametrize("zoned_database", ["Europe/Berlin", "America/New_York"], indirect=True)
def test_partitions_made_in_the_session_zone_are_repaired_without_losing_a_row(
    zoned_database: Database,
) -> None:
    """A database that ran the first schema in a zone other than UTC: its partitions have
    zone-shifted bounds (gaps and overlaps) and hold rows of the wrong month."""
    db = zoned_database
    upgrade(db.url, "0001")
    made = []
    for k in range(12):
        at = datetime(YEAR, k + 1, 1, tzinfo=UTC)
        try:  # in Berlin, November overlaps October's shifted range and cannot be made
            db.execute("SELECT meterline_ensure_usage_partition($1)", at)
            made.append(at)
        except Exception:
            pass
    account_id = uuid.uuid4()
    # Rows the shifted bounds accepted, some into the wrong month's partition.
    kept = []
    for at in edges(YEAR):
        try:
            insert_rows(db, account_id, at)
            kept.append(at)
        except Exception:
            pass
    misplaced = [
        at for at, part in rows_by_partition(db, account_id) if part != expected_partition(at)
    ]
    assert kept and (misplaced or len(made) < 12 or len(kept) < len(edges(YEAR)))

    upgrade(db.url)
    assert_utc_months(db)
    assert rows_by_partition(db, account_id) == [
        (at, expected_partition(at)) for at in sorted(kept)
    ]
    # And the months that had no room before take their rows now.
    missing = sorted(set(edges(YEAR)) - set(kept))
    for k in range(12):
        db.execute(
            "SELECT meterline_ensure_usage_partition($1)", datetime(YEAR, k + 1, 1, tzinfo=UTC)
        )
    insert_rows(db, account_id, *missing)
    assert rows_by_partition(db, account_id) == [(at, expected_partition(at)) for at in edges(YEAR)]
