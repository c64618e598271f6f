"""Fixtures: a real Postgres built by the migrations, the mock provider, and `meterline serve`.

With `METERLINE_DATABASE_URL` set, each run creates (and drops) its own databases on that
server; without it, the run starts an embedded Postgres (pgserver) in a temporary folder.
"""

from __future__ import annotations

import os
import secrets
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy.engine import make_url

from service.db.embedded import EmbeddedPostgres
from service.db.migrate import upgrade
from tests.support import Database, free_port, running

ADMIN_TOKEN = "test-admin-" + secrets.token_hex(8)
PROVIDER_KEY = "sk-provider-" + secrets.token_hex(12)


def _with_database(url: str, name: str) -> str:
    return make_url(url).set(database=name).render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A URL of a Postgres server on which the run may create databases."""
    url = os.environ.get("METERLINE_DATABASE_URL")
    if url:
        yield url
        return
    embedded = EmbeddedPostgres(tmp_path_factory.mktemp("embedded"))
    try:
        yield embedded.start(create=True)
    finally:
        embedded.stop()


@pytest.fixture(scope="session")
def template_database(postgres_server: str) -> Iterator[str]:
    """A database migrated to head; never connected to afterwards, so it can be cloned."""
    admin = Database(postgres_server)
    name = f"meterline_tmpl_{secrets.token_hex(4)}"
    admin.execute(f'CREATE DATABASE "{name}"')
    url = _with_database(postgres_server, name)
    try:
        upgrade(url)
        yield name
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _clone(postgres_server: str, template: str) -> tuple[Database, str]:
    admin = Database(postgres_server)
    name = f"meterline_test_{secrets.token_hex(4)}"
    admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    return admin, name


@pytest.fixture(scope="session")
def database_url(postgres_server: str, template_database: str) -> Iterator[str]:
    """The run's shared database. Tests sharing it isolate themselves by their own accounts."""
    admin, name = _clone(postgres_server, template_database)
    try:
        yield _with_database(postgres_server, name)
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def fresh_database_url(postgres_server: str, template_database: str) -> Iterator[str]:
    """A database of this test's own, for tests of global state (prices, numbering)."""
    admin, name = _clone(postgres_server, template_database)
    try:
        yield _with_database(postgres_server, name)
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def db(database_url: str) -> Database:
    return Database(database_url)


@dataclass
class Upstream:
    url: str  # http://127.0.0.1:PORT

    def v1(self, behaviour: str = "openai") -> str:
        return f"{self.url}/{behaviour}/v1"


@pytest.fixture(scope="session")
def upstream() -> Iterator[Upstream]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["mock-upstream", "--port", str(port), "--api-key", PROVIDER_KEY]
    with running(args, f"{url}/v1/models", env={"NO_PROXY": "*"}):
        yield Upstream(url)


def providers_yaml(upstream: Upstream) -> str:
    """One provider per streaming behaviour, routed by a model-name prefix."""
    return f"""
providers:
  - name: mock
    base_url: {upstream.v1("openai")}
    api_key_env: MOCK_PROVIDER_KEY
    models: ["mock-*", "meta-llama/*", "deepseek-ai/*", "Qwen/*", "openai/*", "unpriced/*"]
    stream_usage: inject
  - name: mock-last
    base_url: {upstream.v1("last")}
    api_key_env: MOCK_PROVIDER_KEY
    models: ["last/*"]
    stream_usage: native
  - name: mock-running
    base_url: {upstream.v1("running")}
    api_key_env: MOCK_PROVIDER_KEY
    models: ["running/*"]
    stream_usage: native
  - name: mock-none
    base_url: {upstream.v1("none")}
    api_key_env: MOCK_PROVIDER_KEY
    models: ["none/*"]
    stream_usage: none
  - name: mock-strict
    base_url: {upstream.v1("strict")}
    api_key_env: MOCK_PROVIDER_KEY
    models: ["strict/*"]
    stream_usage: none
"""


@dataclass
class Meterline:
    url: str  # http://127.0.0.1:PORT
    database_url: str
    data_dir: Path
    log: Path
    pid: int  # the `meterline serve` process (with several workers, their supervisor)

    @property
    def v1(self) -> str:
        return f"{self.url}/v1"

    def admin(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30
        )

    def new_account(self, **fields: object) -> dict[str, object]:
        with self.admin() as client:
            response = client.post("/billing/accounts", json={"name": "test", **fields})
            response.raise_for_status()
            account: dict[str, object] = response.json()
            return account

    def new_key(self, account_id: object, **fields: object) -> str:
        with self.admin() as client:
            response = client.post(f"/billing/accounts/{account_id}/keys", json=fields)
            response.raise_for_status()
            key: str = response.json()["key"]
            return key

    def customer(self, **fields: object) -> tuple[uuid.UUID, str]:
        """A new account (with these fields) and a key of it."""
        account = self.new_account(**fields)
        return uuid.UUID(str(account["id"])), self.new_key(account["id"])


def meterline_env(database_url: str, data_dir: Path, providers: Path) -> dict[str, str]:
    return {
        "METERLINE_DATABASE_URL": database_url,
        "METERLINE_ADMIN_TOKEN": ADMIN_TOKEN,
        "METERLINE_PROVIDERS": str(providers),
        "METERLINE_DATA_DIR": str(data_dir),
        "MOCK_PROVIDER_KEY": PROVIDER_KEY,
        "METERLINE_LEDGER_FLUSH_INTERVAL_S": "0.05",
        # Tests send bursts far above the basic tier's 60 requests a minute; the tests of
        # rate limits start servers with the real tier limits.
        "METERLINE_TIER_BASIC_RPM": "1000000",
    }


@contextmanager
def start_meterline(
    database_url: str, upstream: Upstream, workdir: Path, *args: str, **env: str
) -> Iterator[Meterline]:
    """`meterline serve` as a user runs it, on a free port, stopped with SIGTERM afterwards."""
    workdir.mkdir(parents=True, exist_ok=True)
    providers = workdir / "providers.yaml"
    providers.write_text(providers_yaml(upstream))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = workdir / "meterline.log"
    data_dir = workdir / "data"
    with running(
        ["serve", "--port", str(port), *args],
        f"{url}/healthz",
        env={**meterline_env(database_url, data_dir, providers), **env},
        log=log,
    ) as process:
        yield Meterline(url, database_url, data_dir, log, process.pid)


@pytest.fixture(scope="session")
def meterline(
    database_url: str, upstream: Upstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Meterline]:
    """The run's shared Meterline server (one worker), on the shared database."""
    with start_meterline(database_url, upstream, tmp_path_factory.mktemp("meterline")) as server:
        yield server


@pytest.fixture(scope="session")
def reliability_server(
    postgres_server: str,
    template_database: str,
    upstream: Upstream,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Meterline]:
    """The server the limits, metrics, bad-input and security tests share (tests/reliability.py)."""
    from tests.reliability import reliability_server

    workdir = tmp_path_factory.mktemp("reliability")
    with reliability_server(postgres_server, template_database, upstream, workdir) as server:
        yield server
