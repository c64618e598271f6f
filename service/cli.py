"""The `meterline` command line."""

from __future__ import annotations

import asyncio
import errno
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from typing import Annotated

import typer
import yaml

from service.accounts.cli import accounts_app, keys_app
from service.commands.api import API_CLIENTS
from service.commands.database import DIRECT
from service.commands.output import fail
from service.db.embedded import NoEmbeddedDatabase, database_url
from service.db.migrate import downgrade, upgrade
from service.demo import prepare_demo, write_demo_file
from service.invoices.cli import invoices_app
from service.metrics import multiproc as metrics_multiproc
from service.prices.cli import prices_app
from service.provider_costs.cli import provider_costs_app
from service.providers.config import Provider, load_providers
from service.quotes.cli import quote
from service.reports.cli import report_app, unpriced
from service.reports.margin.cli import margin
from service.serving import serve_app
from service.settings import Settings, get_settings
from service.startup import Serving, meterline_version, startup_summary
from service.tasks.cli import tasks_app
from service.usage.cli import usage_app

app = typer.Typer(
    help="Meterline: usage metering and outcome-based billing for LLM APIs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
# The two families of commands, each under its own heading of `meterline --help`; `prices`
# and `invoices` mix them, each subcommand under its family's heading.
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
app.add_typer(db_app, name="db", rich_help_panel=DIRECT)
app.add_typer(accounts_app, name="accounts", rich_help_panel=API_CLIENTS)
app.add_typer(keys_app, name="keys", rich_help_panel=API_CLIENTS)
app.add_typer(usage_app, name="usage", rich_help_panel=API_CLIENTS)
app.add_typer(report_app, name="report", rich_help_panel=API_CLIENTS)
app.add_typer(tasks_app, name="tasks", rich_help_panel=API_CLIENTS)
app.command("quote", rich_help_panel=API_CLIENTS)(quote)
app.add_typer(prices_app, name="prices", rich_help_panel=API_CLIENTS)
app.add_typer(provider_costs_app, name="provider-costs", rich_help_panel=API_CLIENTS)
app.add_typer(invoices_app, name="invoices", rich_help_panel=API_CLIENTS)
report_app.command("margin")(margin)
invoices_app.command("unpriced", rich_help_panel=API_CLIENTS)(unpriced)
# The defaults `serve` falls back on when neither an option nor its variable is given.
DEFAULTS = Settings.model_construct()


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"meterline {meterline_version()}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    pass


def _use_database(url: str) -> Settings:
    """Make the resolved URL the setting of this process and of the workers it spawns."""
    os.environ["METERLINE_DATABASE_URL"] = url
    get_settings.cache_clear()
    return get_settings()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _start_demo_upstream(settings: Settings) -> subprocess.Popen[bytes]:
    """Run the mock provider and point a providers file at it, unless one is configured."""
    port = _free_port()
    upstream = subprocess.Popen(
        [sys.executable, "-m", "service", "mock-upstream", "--port", str(port)]
    )
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            break
        except OSError:
            time.sleep(0.05)
    if not os.environ.get("METERLINE_PROVIDERS"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        path = (settings.data_dir / "demo-providers.yaml").resolve()
        path.write_text(
            "providers:\n"
            "  - name: demo\n"
            f"    base_url: http://127.0.0.1:{port}/v1\n"
            "    models: ['mock-*', 'meta-llama/*', 'deepseek-ai/*', 'Qwen/*', 'openai/*']\n"
            "    stream_usage: inject\n"
        )
        os.environ["METERLINE_PROVIDERS"] = str(path)
    return upstream


def _start_demo(settings: Settings, host: str, port: int) -> subprocess.Popen[bytes]:
    """The mock provider, and the demo's admin token (unless one is set), account and key,
    the same ones on every restart (service/demo.py)."""
    upstream = _start_demo_upstream(settings)
    admin_from_env = settings.admin_token is not None
    assert settings.database_url
    identity = asyncio.run(
        prepare_demo(
            settings.database_url,
            settings.data_dir,
            settings.admin_token.get_secret_value() if settings.admin_token else None,
        )
    )
    os.environ["METERLINE_ADMIN_TOKEN"] = identity.admin_token
    get_settings.cache_clear()
    url = f"http://{host}:{port}"
    variables = write_demo_file(settings.data_dir, url, identity, admin_from_env)
    typer.echo(
        f"\nMeterline demo on {url}\n"
        f"  demo API key:  {identity.key}\n"
        f"  admin token:   {identity.admin_token}\n"
        f"  account:       {identity.account_id}\n"
        f"  (the same on every restart; as $ML, $KEY, …: . {shlex.quote(str(variables))})\n\n"
        "  from openai import OpenAI\n"
        f"  client = OpenAI(base_url='{url}/v1', api_key='{identity.key}')\n"
        "  client.chat.completions.create(model='mock-chat',\n"
        "      messages=[{'role': 'user', 'content': 'Hello'}])\n"
    )
    return upstream


def _port_free_or_exit(host: str, port: int) -> None:
    """Stop with one line when the port is taken, before anything is created or written:
    no embedded Postgres, no demo key, no providers file."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        fail(f"cannot listen on {host}:{port}: {exc.strerror}")
    with socket.socket(family, kind, proto) as probe:
        # As uvicorn binds: a port left in TIME_WAIT by a server just stopped is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                fail(f"port {port} on {host} is in use: stop what listens there or pass --port")
            fail(f"cannot listen on {host}:{port}: {exc.strerror}")


def _providers_or_exit(settings: Settings) -> list[Provider]:
    """The providers file read now, so a broken one stops `serve` with one clear line."""
    try:
        return load_providers(settings.providers)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        typer.echo(f"error: providers file {settings.providers}: {exc}", err=True)
        raise typer.Exit(1) from None


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(0)


@app.command()
def serve(
    host: str = typer.Option(
        None, help="Interface to listen on (or METERLINE_HOST).", show_default=DEFAULTS.host
    ),
    port: int = typer.Option(
        None, help="Port (or METERLINE_PORT).", show_default=str(DEFAULTS.port)
    ),
    workers: int = typer.Option(
        None, help="Worker processes (or METERLINE_WORKERS).", show_default=str(DEFAULTS.workers)
    ),
    demo: bool = typer.Option(False, help="Also run the mock provider and print a demo key."),
) -> None:
    """Run the proxy and the billing API on one port."""
    settings = get_settings()
    host = host or settings.host
    port = port or settings.port
    workers = workers or settings.workers
    _port_free_or_exit(host, port)
    # Workers read their count (limits warn when counters cannot be shared) and write
    # their metrics where /metrics can sum them, whichever worker answers.
    os.environ["METERLINE_WORKERS"] = str(workers)
    get_settings.cache_clear()
    providers = [] if demo else _providers_or_exit(settings)
    metrics_multiproc.prepare(settings.data_dir)
    upstream = None
    embedded_pgdata = None if settings.database_url else (settings.data_dir / "pg").resolve()
    # uvicorn re-raises the signal that stopped it once it has shut down gracefully; turning
    # it into SystemExit lets the `finally` blocks below stop the embedded Postgres.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    with database_url(settings, create=True) as url:
        settings = _use_database(url)
        if settings.auto_migrate:
            upgrade(url)
        try:
            if demo:
                upstream = _start_demo(settings, host, port)
                settings = get_settings()
                providers = _providers_or_exit(settings)
            serving = Serving(host, port, workers, url, embedded_pgdata)
            typer.echo(startup_summary(settings, serving, providers, dict(os.environ)), err=True)
            serve_app("service.app:create_app", host, port, workers, timeout_graceful_shutdown=30)
        finally:
            if upstream is not None:
                upstream.terminate()
                upstream.wait(timeout=10)


@app.command("mock-upstream")
def mock_upstream(
    host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
    port: int = typer.Option(9090, help="Port."),
    api_key: str = typer.Option(None, help="Require this provider key (Bearer)."),
    workers: int = typer.Option(1, help="Worker processes."),
) -> None:
    """Run the OpenAI-compatible mock provider (tests, benchmarks, the demo)."""
    if api_key:
        os.environ["METERLINE_MOCK_API_KEY"] = api_key
    serve_app("service.mock_upstream.app:create_app_from_env", host, port, workers)


@db_app.command("upgrade")
def db_upgrade(revision: str = typer.Argument("head")) -> None:
    """Apply migrations up to REVISION (and create the embedded Postgres if there is none)."""
    with database_url(get_settings(), create=True) as url:
        upgrade(url, revision)
    typer.echo(f"database at {revision}")


@db_app.command("downgrade")
def db_downgrade(revision: str = typer.Argument(...)) -> None:
    """Revert migrations down to REVISION (`base` for an empty database)."""
    try:
        with database_url(get_settings()) as url:
            downgrade(url, revision)
    except NoEmbeddedDatabase as exc:
        fail(str(exc))
    typer.echo(f"database at {revision}")


def main() -> None:
    app()
