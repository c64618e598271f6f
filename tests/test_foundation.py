"""The foundation as a user meets it: schema, `meterline serve`, `/healthz`, embedded default."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from service.db.engine import create_engine, session_factory, transaction
from service.db.migrate import downgrade, upgrade
from service.db.session import after_commit
from tests.conftest import Meterline
from tests.support import ROOT, Database, free_port, running


def test_healthz_reports_the_database(meterline: Meterline) -> None:
    response = httpx.get(f"{meterline.url}/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "database": "ok"}


def test_ledger_is_partitioned_by_month_with_current_partitions(db: Database) -> None:
    kind = db.fetchval("SELECT relkind FROM pg_class WHERE relname = 'usage_ledger'")
    assert kind == b"p" or kind == "p"
    now = datetime.now(UTC)
    name = db.fetchval("SELECT meterline_ensure_usage_partition($1)", now)
    assert name == f"usage_ledger_p{now:%Y%m}"
    partitions = {
        r["relname"]
        for r in db.fetch(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'usage_ledger'"
        )
    }
    assert name in partitions


def test_a_replayed_ledger_row_is_not_counted_twice(db: Database) -> None:
    insert = (
        "INSERT INTO usage_ledger (request_id, occurred_at, account_id, endpoint, "
        "requested_model, stream, status_code, prompt_tokens, completion_tokens, total_tokens, "
        "usage_source) VALUES ($1, $2, gen_random_uuid(), 'chat', 'm', false, 200, 3, 4, 7, "
        "'upstream') ON CONFLICT DO NOTHING"
    )
    at = datetime.now(UTC)
    db.execute(insert, "req_foundation_replay", at)
    db.execute(insert, "req_foundation_replay", at)
    count = db.fetchval(
        "SELECT count(*) FROM usage_ledger WHERE request_id = 'req_foundation_replay'"
    )
    assert count == 1


def test_migrations_downgrade_to_base_and_upgrade_again(fresh_database_url: str) -> None:
    db = Database(fresh_database_url)
    downgrade(fresh_database_url, "base")
    assert db.fetchval("SELECT to_regclass('usage_ledger')") is None
    upgrade(fresh_database_url)
    assert db.fetchval("SELECT to_regclass('usage_ledger')") is not None


async def test_after_commit_effects_follow_a_commit_and_never_a_rollback(
    database_url: str,
) -> None:
    engine = create_engine(database_url, pool_size=2)
    sessions = session_factory(engine)
    seen: list[str] = []

    async def committed(xid: str, name: str) -> None:
        # Another connection sees the transaction committed when its effects run.
        async with sessions() as other:
            status = await other.scalar(text(f"SELECT pg_xact_status('{xid}'::xid8)"))
        seen.append(f"{name}:{status}")

    try:
        async with transaction(sessions) as session:
            xid = str(await session.scalar(text("SELECT pg_current_xact_id()")))
            after_commit(session, lambda: seen.append("plain"))
            after_commit(session, lambda: committed(xid, "awaited"))
            assert seen == []
        assert seen == ["plain", "awaited:committed"]
        with pytest.raises(ZeroDivisionError):
            async with transaction(sessions) as session:
                await session.execute(text("SELECT 1"))
                after_commit(session, lambda: seen.append("rolled back"))
                1 / 0  # noqa: B018
        assert seen == ["plain", "awaited:committed"]
    finally:
        await engine.dispose()


def test_billing_api_requires_credentials(meterline: Meterline) -> None:
    response = httpx.post(f"{meterline.url}/billing/accounts", json={"name": "x"})
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"


def test_validation_errors_name_the_field(meterline: Meterline) -> None:
    with meterline.admin() as client:
        response = client.post("/billing/accounts", json={"name": ""})
    assert response.status_code == 422
    assert response.json()["error"]["param"] == "body.name"


@pytest.mark.slow
def test_serve_with_the_embedded_default(tmp_path: Path) -> None:
    """No database URL at all: `meterline serve` starts its own Postgres in the data dir."""
    port = free_port()
    data_dir = tmp_path / "data"
    with running(
        ["serve", "--port", str(port)],
        f"http://127.0.0.1:{port}/healthz",
        # An empty URL is the same as none: the embedded default.
        env={"METERLINE_DATABASE_URL": "", "METERLINE_DATA_DIR": str(data_dir)},
        log=tmp_path / "serve.log",
        timeout=120,
    ) as process:
        response = httpx.get(f"http://127.0.0.1:{port}/healthz")
        assert response.json() == {"status": "ok", "database": "ok"}
        assert (data_dir / "pg" / "PG_VERSION").exists()
    assert process.returncode == 0
    # The embedded server was stopped with Meterline: its pid file is gone.
    assert not (data_dir / "pg" / "postmaster.pid").exists()


def test_cli_help_lists_the_commands() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    for command in ("serve", "db", "mock-upstream"):
        assert command in result.stdout
