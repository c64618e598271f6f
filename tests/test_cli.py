"""The command line as a newcomer meets it: help with its defaults, `--version`, tables at
80 columns, a budget cleared, one-line errors, and one database from any folder."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from decimal import Decimal
from importlib.metadata import version
from pathlib import Path
from typing import Any

import psutil
import pytest
import typer
from rich.cells import cell_len
from typer.testing import CliRunner, Result

from service.cli import app as cli_app
from service.commands.api import API_CLIENTS
from service.commands.database import DIRECT
from service.commands.output import print_table
from service.settings import Settings
from tests.conftest import ADMIN_TOKEN, Meterline, _with_database
from tests.support import ROOT, Database


def _meterline(
    *args: str, env: dict[str, str], cwd: Path = ROOT, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        cwd=cwd,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=180,
    )


def _one_line_error(result: subprocess.CompletedProcess[str] | Result) -> str:
    """The error a command printed: one line on stderr, no traceback."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def _commands(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every command and group under `command` (typer's own click), with its path."""
    yield path, command
    if hasattr(command, "commands"):
        for name, sub in command.commands.items():
            yield from _commands(sub, (*path, name))


def test_every_help_shows_each_option_and_its_default() -> None:
    """Rich markup once ate every `[default: …]` written into a help text ("Port .")."""
    runner = CliRunner()
    seen = 0
    for path, command in _commands(typer.main.get_command(cli_app)):
        result = runner.invoke(cli_app, [*path, "--help"], env={"COLUMNS": "300"})
        assert result.exit_code == 0, (path, result.output)
        shown = " ".join(result.output.replace("│", " ").split())
        for param in command.params:
            help_text = getattr(param, "help", None)
            if help_text:
                assert " ".join(help_text.split()) in shown, (path, param.name, shown)
            default = getattr(param, "show_default", None)
            if isinstance(default, str):
                assert f"[default: ({default})]" in shown, (path, param.name)
                seen += 1
    assert seen >= 8  # serve's host, port, workers; --url, --token; outputs, formats…
    serve = runner.invoke(cli_app, ["serve", "--help"], env={"COLUMNS": "300"})
    assert "Port (or METERLINE_PORT). [default: (8080)]" in " ".join(serve.output.split())


def test_each_command_is_under_its_familys_heading() -> None:
    """A command with --url speaks to the API and is listed as such; one without goes
    straight to the database (`serve` and `mock-upstream` run servers: neither)."""
    root = typer.main.get_command(cli_app)
    seen = {API_CLIENTS: 0, DIRECT: 0}
    for path, command in _commands(root):
        if hasattr(command, "commands") or path in {(), ("serve",), ("mock-upstream",)}:
            continue
        group = root.commands[path[0]] if len(path) > 1 else None  # type: ignore[attr-defined]
        panel = command.rich_help_panel or getattr(group, "rich_help_panel", None)
        client = any(param.name == "url" for param in command.params)
        assert panel == (API_CLIENTS if client else DIRECT), path
        seen[panel] += 1
    # db upgrade|downgrade, prices import, provider-costs import, invoices generate|rollup
    assert seen[DIRECT] == 6
    assert seen[API_CLIENTS] >= 18


def test_version() -> None:
    result = _meterline("--version", env=dict(os.environ))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"meterline {version('meterline')}\n"


def _width(text: str) -> int:
    return max(cell_len(line) for line in text.splitlines())


@pytest.mark.parametrize("columns", [80, 60])
def test_a_table_fits_the_terminal_without_cutting_a_value(
    columns: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COLUMNS", str(columns))
    rows = [
        {
            "id": str(uuid.uuid4()),
            "name": "Northwind Traders Worldwide",
            "tier": "custom",
            "monthly_budget_usd": "12500.500000000000",
            "created_at": "2026-11-05T10:39:14.123456Z",
        }
        for _ in range(3)
    ]
    print_table(rows, ["id", "name", "tier", "monthly_budget_usd", "created_at"], "3 accounts")
    out = capsys.readouterr().out
    assert _width(out) <= columns, out
    for row in rows:
        assert row["id"] in out  # whole, on one line: ids are copied from the screen
    words = {w for row in rows for w in ("Northwind", "Worldwide", "12500.50", "10:39:14Z")}
    for word in words:
        assert word in out.split(), (word, out)
    if columns == 60:  # too narrow for the table: one `field value` block per row
        assert out.count("\nname ") == 3 and "Northwind Traders Worldwide" in out
    else:  # a table, its long name wrapped between words
        assert out.count("Northwind") == 3 and "\nname " not in out


def _cli(meterline: Meterline, *args: str, columns: int = 200) -> Result:
    return CliRunner().invoke(
        cli_app,
        [*args, "--url", meterline.url, "--token", ADMIN_TOKEN],
        env={"COLUMNS": str(columns)},
    )


def test_lists_are_readable_at_80_columns(meterline: Meterline) -> None:
    name = f"Readable Widths Corporation {secrets.token_hex(3)}"
    account = meterline.new_account(name=name, monthly_budget_usd="250")
    keys = [
        json.loads(
            _cli(
                meterline, "keys", "create", str(account["id"]), "--name", f"deploy-{i}", "--json"
            ).stdout
        )
        for i in range(2)
    ]
    for args in (["accounts", "list"], ["keys", "list", str(account["id"])]):
        result = _cli(meterline, *args, columns=80)
        assert result.exit_code == 0, result.output
        assert _width(result.stdout) <= 80, result.stdout
        for key in keys:
            if args[0] == "keys":
                assert key["id"] in result.stdout and key["prefix"] in result.stdout
        if args[0] == "accounts":
            assert str(account["id"]) in result.stdout


def test_a_budget_and_limits_are_cleared_from_the_cli(meterline: Meterline) -> None:
    created = _cli(
        meterline, "accounts", "create", "Clear Co", "--budget", "5", "--rpm", "30", "--json"
    )
    assert created.exit_code == 0, created.output
    account = json.loads(created.stdout)
    assert Decimal(account["monthly_budget_usd"]) == 5 and account["rate_limit_rpm"] == 30

    cleared = _cli(
        meterline,
        "accounts",
        "update",
        account["id"],
        "--clear",
        "budget",
        "--clear",
        "rpm",
        "--tier",
        "pro",
        "--json",
    )
    assert cleared.exit_code == 0, cleared.output
    after = json.loads(cleared.stdout)
    assert (after["monthly_budget_usd"], after["rate_limit_rpm"], after["tier"]) == (
        None,
        None,
        "pro",
    )
    with meterline.admin() as admin:
        assert admin.get(f"/billing/accounts/{account['id']}").json()["monthly_budget_usd"] is None

    both = _cli(
        meterline, "accounts", "update", account["id"], "--budget", "3", "--clear", "budget"
    )
    assert both.exit_code == 1
    assert "contradict" in _one_line_error(both)


def test_accounts_low_balance_threshold_is_set_and_cleared_from_the_cli(
    meterline: Meterline,
) -> None:
    created = _cli(
        meterline,
        "accounts",
        "create",
        "Low Co",
        "--low-balance-threshold",
        "2.50",
        "--json",
    )
    assert created.exit_code == 0, created.output
    account = json.loads(created.stdout)
    assert Decimal(account["low_balance_threshold_usd"]) == Decimal("2.50")
    shown = _cli(meterline, "accounts", "show", account["id"])
    assert "2.5" in shown.stdout
    changed = _cli(
        meterline, "accounts", "update", account["id"], "--low-balance-threshold", "1", "--json"
    )
    assert Decimal(json.loads(changed.stdout)["low_balance_threshold_usd"]) == 1
    cleared = _cli(
        meterline, "accounts", "update", account["id"], "--clear", "low-balance-threshold", "--json"
    )
    assert cleared.exit_code == 0, cleared.output
    assert json.loads(cleared.stdout)["low_balance_threshold_usd"] is None
    both = _cli(
        meterline,
        "accounts",
        "update",
        account["id"],
        "--low-balance-threshold",
        "3",
        "--clear",
        "low-balance-threshold",
    )
    assert both.exit_code == 1
    assert "contradict" in _one_line_error(both)
    zero = _cli(meterline, "accounts", "update", account["id"], "--low-balance-threshold", "0")
    assert zero.exit_code == 1
    assert "low_balance_threshold_usd" in _one_line_error(zero)


def test_a_keys_settings_are_changed_and_cleared_from_the_cli(meterline: Meterline) -> None:
    account = meterline.new_account()
    created = json.loads(_cli(meterline, "keys", "create", str(account["id"]), "--json").stdout)
    changed = _cli(
        meterline,
        "keys",
        "update",
        created["id"],
        "--rpm",
        "5",
        "--budget",
        "2.500000000001",
        "--name",
        "ci",
        "--json",
    )
    assert changed.exit_code == 0, changed.output
    key = json.loads(changed.stdout)
    assert (key["rate_limit_rpm"], key["monthly_budget_usd"], key["name"]) == (
        5,
        "2.500000000001",
        "ci",
    )
    cleared = _cli(meterline, "keys", "update", created["id"], "--clear", "rpm", "--json")
    assert cleared.exit_code == 0, cleared.output
    after = json.loads(cleared.stdout)
    assert (after["rate_limit_rpm"], after["monthly_budget_usd"]) == (None, "2.500000000001")
    both = _cli(meterline, "keys", "update", created["id"], "--rpm", "3", "--clear", "rpm")
    assert both.exit_code == 1 and "contradict" in _one_line_error(both)


def _env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERLINE_")}
    return {**env, **values}


def test_a_missing_import_file_is_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "prices.csv"
    result = _meterline("prices", "import", str(missing), env=_env())
    assert result.returncode == 1
    assert _one_line_error(result) == f"error: cannot read {missing}: No such file or directory"


def test_a_database_without_the_schema_is_one_line(postgres_server: str) -> None:
    admin = Database(postgres_server)
    name = f"meterline_empty_{secrets.token_hex(4)}"
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        url = _with_database(postgres_server, name)
        result = _meterline(
            "invoices", "generate", "--period", "2026-01", env=_env(METERLINE_DATABASE_URL=url)
        )
        assert result.returncode == 1
        line = _one_line_error(result)
        assert "has no Meterline schema: run `meterline db upgrade` first" in line
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_the_data_directory_is_the_users(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("METERLINE_DATA_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    assert Settings().data_dir == tmp_path / ".local" / "share" / "meterline"
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert Settings().data_dir == tmp_path / "xdg" / "meterline"
    monkeypatch.setenv("XDG_DATA_HOME", "relative/dir")  # ignored, as the XDG spec says
    assert Settings().data_dir == tmp_path / ".local" / "share" / "meterline"
    monkeypatch.setenv("METERLINE_DATA_DIR", str(tmp_path / "mine"))
    assert Settings().data_dir == tmp_path / "mine"


def _postmaster_pid(pgdata: Path) -> int | None:
    pid_file = pgdata / "postmaster.pid"
    return int(pid_file.read_text().split()[0]) if pid_file.exists() else None


@pytest.mark.slow
def test_one_embedded_database_from_any_folder(tmp_path: Path) -> None:
    """Without a URL every command reaches the cluster `db upgrade` made, wherever it runs;
    none but `serve` and `db upgrade` makes one."""
    home = tmp_path / "home"
    folders = [tmp_path / name for name in ("a", "b", "c")]
    for folder in [home, *folders]:
        folder.mkdir()
    env = _env(HOME=str(home), METERLINE_DATABASE_URL="")
    env.pop("XDG_DATA_HOME", None)
    pgdata = home / ".local" / "share" / "meterline" / "pg"

    before = _meterline("invoices", "generate", "--period", "2026-01", env=env, cwd=folders[0])
    assert before.returncode == 1
    line = _one_line_error(before)
    assert f"there is no embedded Postgres in {pgdata}" in line and "meterline serve" in line
    assert not pgdata.exists() and not (folders[0] / ".meterline").exists()

    upgraded = _meterline("db", "upgrade", env=env, cwd=folders[0])
    assert upgraded.returncode == 0, upgraded.stderr
    assert (pgdata / "PG_VERSION").exists()

    table = folders[1] / "prices.yaml"
    table.write_text(
        textwrap.dedent("""\
            prices:
              - model: anywhere/m
                usd_per_mtok: 2
                effective_from: 2026-01-01T00:00:00Z
            """)
    )
    imported = _meterline("prices", "import", "prices.yaml", env=env, cwd=folders[1])
    assert imported.returncode == 0, imported.stderr
    assert "imported 1 new versions" in imported.stderr
    again = _meterline("prices", "import", str(table), env=env, cwd=folders[2])
    assert again.returncode == 0, again.stderr
    assert "imported 0 new versions, 1 already present" in again.stderr
    # Each command stopped the server it started.
    assert _postmaster_pid(pgdata) is None


@pytest.mark.slow
def test_a_killed_process_does_not_keep_the_embedded_postgres_running(tmp_path: Path) -> None:
    """pgserver stops the server with its last holder; one killed by SIGKILL stays listed as
    a holder, and the server ran for good after every later start."""
    data_dir = tmp_path / "data"
    env = _env(METERLINE_DATA_DIR=str(data_dir), METERLINE_DATABASE_URL="")
    holds_then_dies = (
        "import os, signal\n"
        "from pathlib import Path\n"
        "from service.db.embedded import EmbeddedPostgres\n"
        f"EmbeddedPostgres(Path({str(data_dir)!r})).start(create=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    killed = subprocess.run([sys.executable, "-c", holds_then_dies], cwd=ROOT, env=env, timeout=180)
    assert killed.returncode == -signal.SIGKILL
    pgdata = data_dir / "pg"
    pid = _postmaster_pid(pgdata)
    assert pid is not None and psutil.pid_exists(pid)  # orphaned, still running
    try:
        upgraded = _meterline("db", "upgrade", env=env)
        assert upgraded.returncode == 0, upgraded.stderr
        assert _postmaster_pid(pgdata) is None
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
    finally:
        if psutil.pid_exists(pid):
            os.kill(pid, signal.SIGTERM)
