"""`meterline serve --demo`: the same admin token, account and key on every restart, priced
mock models, and a busy port refused before anything is written."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest
from openai import OpenAI

from service.demo import read_demo_file
from tests.support import ROOT, Database, free_port, running

NOT_INHERITED = ("METERLINE_ADMIN_TOKEN", "METERLINE_PROVIDERS", "METERLINE_PORT")


@pytest.fixture(autouse=True)
def _no_configured_demo(monkeypatch: pytest.MonkeyPatch) -> None:
    # The demo makes its own admin token and providers file only when none is configured.
    for name in NOT_INHERITED:
        monkeypatch.delenv(name, raising=False)


def _start_demo(database_url: str, data_dir: Path, log: Path) -> dict[str, str]:
    """Start the demo, ask it the Quick start's question, stop it; what its file says."""
    port = free_port()
    env = {"METERLINE_DATABASE_URL": database_url, "METERLINE_DATA_DIR": str(data_dir)}
    with running(
        ["serve", "--demo", "--port", str(port)],
        f"http://127.0.0.1:{port}/healthz",
        env={**env, "METERLINE_LEDGER_FLUSH_INTERVAL_S": "0.05", "NO_PROXY": "*"},
        log=log,
    ):
        demo = read_demo_file(data_dir)
        assert demo["ML"] == f"http://127.0.0.1:{port}"
        client = OpenAI(base_url=demo["ML"] + "/v1", api_key=demo["KEY"], max_retries=0)
        reply = client.chat.completions.with_raw_response.create(
            model="mock-chat", messages=[{"role": "user", "content": "Hello"}]
        )
        assert Decimal(reply.headers["x-meterline-cost-usd"]) > 0
    return demo


def test_restarts_reuse_the_token_the_account_and_the_key(
    fresh_database_url: str, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    starts = [_start_demo(fresh_database_url, data_dir, tmp_path / f"{n}.log") for n in range(3)]
    assert all(s["METERLINE_ADMIN_TOKEN"].startswith("mla-") for s in starts)
    for name in ("METERLINE_ADMIN_TOKEN", "KEY", "ACCOUNT_ID"):
        assert len({s[name] for s in starts}) == 1, name
    db = Database(fresh_database_url)
    assert db.fetchval("SELECT count(*) FROM accounts WHERE name = 'Demo'") == 1
    assert db.fetchval("SELECT count(*) FROM api_keys") == 1
    # The key is a secret: the file is its owner's only.
    assert stat.S_IMODE((data_dir / "demo.env").stat().st_mode) == 0o600
    # Each start's Quick start request is in the ledger with its cost; the shipped list is
    # still loaded beside the demo's prices.
    rows = db.fetch("SELECT cost_usd FROM usage_ledger WHERE requested_model = 'mock-chat'")
    assert len(rows) == 3 and all(r["cost_usd"] > 0 for r in rows)
    assert db.fetchval("SELECT count(*) FROM price_versions WHERE source = 'default'") > 0


def test_a_busy_port_stops_the_demo_before_anything_is_written(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    earlier = {"demo.env": "export KEY=ml-earlier\n", "demo-providers.yaml": "providers: []\n"}
    for name, text in earlier.items():
        (data_dir / name).write_text(text)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if k != "METERLINE_DATABASE_URL"}
        # No database URL: a start that went on would create an embedded Postgres here.
        result = subprocess.run(
            [sys.executable, "-m", "service", "serve", "--demo", "--port", str(port)],
            env={**env, "METERLINE_DATA_DIR": str(data_dir), "COLUMNS": "200"},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"error: port {port} on 127.0.0.1 is in use: stop what listens there or pass --port"
    )
    assert "ml-" not in result.stdout + result.stderr
    assert sorted(p.name for p in data_dir.iterdir()) == sorted(earlier)
    for name, text in earlier.items():
        assert (data_dir / name).read_text() == text
