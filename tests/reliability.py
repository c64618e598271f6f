"""Helpers of the limits, budgets, fault and bad-input tests: own databases, Redis, servers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import redis

from service.db.embedded import EmbeddedPostgres
from tests.conftest import (
    ADMIN_TOKEN,
    Meterline,
    Upstream,
    meterline_env,
    providers_yaml,
    start_meterline,
)
from tests.support import ROOT, Database, free_port, wait_for_http

REDIS_URL = "redis://127.0.0.1:6379/0"


def redis_available() -> bool:
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=0.5)
    try:
        return bool(client.ping())
    except (OSError, redis.RedisError):
        return False
    finally:
        client.close()


@contextmanager
def redis_namespace() -> Iterator[dict[str, str]]:
    """Server settings for a Redis namespace of this test's own, deleted afterwards."""
    prefix = f"meterline-test-{secrets.token_hex(6)}:"
    try:
        yield {"METERLINE_REDIS_URL": REDIS_URL, "METERLINE_REDIS_PREFIX": prefix}
    finally:
        client = redis.Redis.from_url(REDIS_URL)
        try:
            keys = list(client.scan_iter(match=f"{prefix}*"))
            if keys:
                client.delete(*keys)
        finally:
            client.close()


@contextmanager
def own_database(postgres_server: str, template_database: str) -> Iterator[str]:
    """A database cloned from the migrated template, dropped afterwards."""
    from tests.conftest import _with_database

    admin = Database(postgres_server)
    name = f"meterline_rel_{secrets.token_hex(4)}"
    admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"')
    try:
        yield _with_database(postgres_server, name)
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def wait_for_fresh_window(needed_s: float = 10.0) -> None:
    """Start in a rate-limit window (a UTC minute) with at least `needed_s` left in it."""
    left = 60 - time.time() % 60
    if left < needed_s:
        time.sleep(left + 0.05)


def admin(url: str) -> httpx.Client:
    return httpx.Client(
        base_url=url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30
    )


def new_customer(url: str, **account: Any) -> tuple[uuid.UUID, uuid.UUID, str]:
    """(account id, key id, key) of a new account created through the billing API."""
    with admin(url) as client:
        created = client.post("/billing/accounts", json={"name": "reliability", **account})
        created.raise_for_status()
        account_id = created.json()["id"]
        key = client.post(f"/billing/accounts/{account_id}/keys", json={})
        key.raise_for_status()
    return uuid.UUID(account_id), uuid.UUID(key.json()["id"]), key.json()["key"]


def add_price(db: Database, model: str, usd_per_mtok: Decimal) -> None:
    db.execute(
        "INSERT INTO price_versions (model, input_usd_per_mtok, output_usd_per_mtok, "
        "effective_from, source) VALUES ($1, $2, $2, '1970-01-01', 'test')",
        model,
        usd_per_mtok,
    )


def wait_for_rows(db: Database, sql: str, *args: Any, count: int, timeout: float = 20.0) -> int:
    """Poll `sql` (a count) until it reaches `count` or time runs out; returns the last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = int(db.fetchval(sql, *args) or 0)
        if value >= count or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


async def burst(
    base_url: str, key: str, n: int, **create: Any
) -> list[openai.APIStatusError | Any]:
    """`n` concurrent chat completions; each result is the raw response or the API error."""
    client = openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=60)

    async def one() -> openai.APIStatusError | Any:
        try:
            return await client.chat.completions.with_raw_response.create(**create)
        except openai.APIStatusError as error:
            return error

    try:
        return await asyncio.gather(*(one() for _ in range(n)))
    finally:
        await client.close()


def meterline_settings(**more: str) -> dict[str, str]:
    """Settings of the reliability tests' servers: limits and budgets seen within a second."""
    return {"METERLINE_KEY_CACHE_REFRESH_S": "0.5", **more}


# The real tier limits (the shared test environment raises the basic tier's).
REAL_TIERS = {"METERLINE_TIER_BASIC_RPM": "60", "METERLINE_TIER_PRO_RPM": "600"}


class StoppablePostgres:
    """A Postgres of the test's own (pgserver in a temporary folder) it may stop and start.

    Never the shared server: stopping that would break every other test.
    """

    def __init__(self, root: Path) -> None:
        self.embedded = EmbeddedPostgres(root)
        self.url = ""

    def start(self) -> str:
        self.url = self.embedded.start(create=True)
        return self.url

    def _pg_ctl(self, *args: str) -> None:
        from pgserver import _commands

        # pgserver's own pg_ctl: it runs as the user pgserver made the cluster for.
        pg_ctl = _commands.pg_ctl  # type: ignore[attr-defined]
        server = self.embedded._server
        pg_ctl(list(args), pgdata=server.pgdata, user=server.system_user, timeout=60)

    def stop(self) -> None:
        """What an outage looks like to clients: every connection dropped, none accepted."""
        self._pg_ctl("-m", "fast", "-w", "stop")

    def restart(self) -> None:
        server = self.embedded._server
        socket_dir = server.get_postmaster_info().socket_dir
        self._pg_ctl("-w", "-o", '-h ""', "-o", f"-k {socket_dir}", "-l", str(server.log), "start")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.embedded.stop()


def _living(group: int, among: set[int] | None = None) -> set[int]:
    """The processes of a process group that still run: a zombie has closed its files."""
    if among is None:
        among = {int(name) for name in os.listdir("/proc") if name.isdigit()}
    living = set()
    for pid in among:
        try:
            # /proc/PID/stat: "pid (comm) state ppid pgrp …"; comm may hold spaces.
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            living.add(pid)
    return living


class Server:
    """`meterline serve` as a process the test signals itself (SIGTERM, SIGKILL).

    It runs in a process group of its own, as a container's processes do: `kill()` takes the
    server down with all its workers at once, and `stop()` leaves none of them behind. A
    restart (`start()` again) keeps its port, data directory (spool, journal) and log.
    """

    def __init__(
        self, database_url: str, upstream: Upstream, workdir: Path, *args: str, **env: str
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        providers = workdir / "providers.yaml"
        providers.write_text(providers_yaml(upstream))
        self.data_dir = workdir / "data"
        self.log = workdir / "meterline.log"
        self.env = {
            **os.environ,
            **meterline_env(database_url, self.data_dir, providers),
            **meterline_settings(),
            **env,
        }
        self.args = args
        self.process: subprocess.Popen[bytes] | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def v1(self) -> str:
        return f"{self.url}/v1"

    @property
    def spool(self) -> Path:
        return self.data_dir / "spool"

    def start(self, timeout: float = 60) -> Server:
        """Start it and wait until it answers (within `timeout` seconds)."""
        self.port = self.port or free_port()
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "service", "serve", "--port", str(self.port), *self.args],
                env=self.env,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for_http(f"{self.url}/healthz", timeout, self.process)
        return self

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL to the server and every worker at once: a container killed, a host lost.
        Returns once every one of them is gone: a killed process keeps its sockets (and
        takes connections on them) until its memory is torn down, which under load takes
        tens of milliseconds after the signal."""
        assert self.process is not None
        group = self.process.pid
        members = _living(group)
        os.killpg(group, signal.SIGKILL)
        self.process.wait(timeout=30)
        deadline = time.monotonic() + 30
        while _living(group, among=members):
            assert time.monotonic() < deadline, f"processes of group {group} outlive SIGKILL"
            time.sleep(0.002)

    def wait(self, timeout: float = 60) -> int:
        assert self.process is not None
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        # Workers whose parent was killed would otherwise outlive the test.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)

    def spooled(self) -> list[Path]:
        """Batches waiting in the spool, claimed for replay or not."""
        if not self.spool.exists():
            return []
        return [p for p in self.spool.iterdir() if p.is_file() and ".jsonl" in p.name]


def journaled_ids(server: Server) -> set[str]:
    """Request ids in the journal segments on disk (JSON lines, read without parsing)."""
    ids = set()
    for path in (server.spool / "journal").glob("*.journal"):
        for line in path.read_bytes().splitlines():
            ids.add(line.split(b'"request_id":"', 1)[1].split(b'"', 1)[0].decode())
    return ids


@dataclass
class Outcome:
    """What the client saw of one request."""

    started: float  # monotonic
    finished: float
    stream: bool
    status: int | None = None  # None: no HTTP answer at all (connection refused or cut)
    request_id: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    complete: bool = False  # a whole body (every chunk up to the end of the stream)
    error: str | None = None

    @property
    def served(self) -> bool:
        return self.status == 200 and self.complete


class SteadyLoad:
    """Requests at a steady rate from a thread of its own, plain and streamed, until stopped."""

    def __init__(
        self,
        base_url: str,
        key: str,
        model: str,
        rate: float = 20.0,
        stream_every: int = 3,
        chunks: int = 8,
        chunk_delay_ms: int = 20,
    ) -> None:
        self.base_url = base_url
        self.key = key
        self.model = model
        self.rate = rate
        self.stream_every = stream_every
        self.mock = {"chunks": chunks, "chunk_delay_ms": chunk_delay_ms}
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def start(self) -> SteadyLoad:
        self._thread.start()
        return self

    def stop(self) -> list[Outcome]:
        self._stop.set()
        self._thread.join(timeout=120)
        return self.outcomes

    async def _run(self) -> None:
        client = openai.AsyncOpenAI(
            base_url=self.base_url, api_key=self.key, max_retries=0, timeout=60
        )
        tasks = []
        try:
            n = 0
            while not self._stop.is_set():
                tasks.append(asyncio.create_task(self._one(client, n % self.stream_every == 0)))
                n += 1
                await asyncio.sleep(1 / self.rate)
            await asyncio.gather(*tasks)
        finally:
            await client.close()

    async def _one(self, client: openai.AsyncOpenAI, stream: bool) -> None:
        outcome = Outcome(started=time.monotonic(), finished=0.0, stream=stream)
        self.outcomes.append(outcome)
        create: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "user", "content": f"request {len(self.outcomes)}"}],
            "extra_body": {"mock": self.mock},
        }
        try:
            if stream:
                async with client.chat.completions.with_streaming_response.create(
                    stream=True, stream_options={"include_usage": True}, **create
                ) as response:
                    outcome.status = response.status_code
                    outcome.request_id = response.headers.get("x-request-id")
                    async for chunk in await response.parse():
                        if chunk.usage is not None:
                            outcome.prompt_tokens = chunk.usage.prompt_tokens
                            outcome.completion_tokens = chunk.usage.completion_tokens
                    outcome.complete = outcome.completion_tokens is not None
            else:
                raw = await client.chat.completions.with_raw_response.create(**create)
                reply = raw.parse()
                outcome.status = raw.status_code
                outcome.request_id = raw.headers.get("x-request-id")
                if reply.usage is not None:
                    outcome.prompt_tokens = reply.usage.prompt_tokens
                    outcome.completion_tokens = reply.usage.completion_tokens
                outcome.complete = True
        except openai.APIStatusError as error:
            outcome.status = error.status_code
            outcome.request_id = error.response.headers.get("x-request-id")
            outcome.error = type(error).__name__
        except Exception as error:  # connection refused or cut: no (whole) answer
            cause = error.__cause__ or error.__context__
            outcome.error = type(error).__name__ + (f"({type(cause).__name__})" if cause else "")
        finally:
            outcome.finished = time.monotonic()


@dataclass
class LedgerCheck:
    """The ledger against what clients saw: the counts every fault test prints and checks."""

    served: int
    recorded: int
    lost: int  # served requests missing from the ledger
    duplicated: int  # ledger rows beyond one per request id
    wrong_tokens: int  # served requests whose row's tokens differ from the response's usage
    unanswered_recorded: int  # rows of requests whose client got no answer (cut by a kill)

    def line(self, label: str) -> str:
        return (
            f"[{label}] served={self.served} recorded={self.recorded} lost={self.lost} "
            f"duplicated={self.duplicated} wrong_tokens={self.wrong_tokens} "
            f"unanswered_recorded={self.unanswered_recorded}"
        )


def check_ledger(db: Database, account_id: uuid.UUID, outcomes: list[Outcome]) -> LedgerCheck:
    rows = db.fetch(
        "SELECT request_id, prompt_tokens, completion_tokens FROM usage_ledger "
        "WHERE account_id = $1",
        account_id,
    )
    by_id: dict[str, dict[str, Any]] = {}
    for row in rows:
        by_id.setdefault(row["request_id"], row)
    served = [o for o in outcomes if o.served]
    answered = {o.request_id for o in outcomes if o.request_id}
    wrong = 0
    lost = 0
    for outcome in served:
        found = by_id.get(outcome.request_id or "")
        if found is None:
            lost += 1
        elif (found["prompt_tokens"], found["completion_tokens"]) != (
            outcome.prompt_tokens,
            outcome.completion_tokens,
        ):
            wrong += 1
    return LedgerCheck(
        served=len(served),
        recorded=len(rows),
        lost=lost,
        duplicated=len(rows) - len(by_id),
        wrong_tokens=wrong,
        unanswered_recorded=len(set(by_id) - answered),
    )


def wait_until_settled(db: Database, account_id: uuid.UUID, timeout: float = 60.0) -> int:
    """Wait until the account's ledger count stops changing (spool replayed, queue drained)."""
    deadline = time.monotonic() + timeout
    last, stable_since = -1, time.monotonic()
    while time.monotonic() < deadline:
        count = int(
            db.fetchval("SELECT count(*) FROM usage_ledger WHERE account_id = $1", account_id)
        )
        if count != last:
            last, stable_since = count, time.monotonic()
        elif time.monotonic() - stable_since > 2.0:
            break
        time.sleep(0.2)
    return last


# Models the shared reliability server prices itself, so no other test's price changes
# can move the numbers: $2 and $1,000 per million tokens.
METRICS_MODEL = f"meta-llama/metrics-{secrets.token_hex(3)}"
BUDGET_MODEL = "meta-llama/budget-test"
LIMIT_BYTES = 64 * 1024


@contextmanager
def reliability_server(
    postgres_server: str, template_database: str, upstream: Upstream, workdir: Path
) -> Iterator[Meterline]:
    """One server on a database of its own for the limits, metrics, bad-input, security and
    upstream-fault tests: the real tier limits, a 64 KiB body limit, debug logs, a 2 s
    upstream read timeout and a provider nothing listens for (`refused/*`)."""
    with own_database(postgres_server, template_database) as url:
        db = Database(url)
        add_price(db, METRICS_MODEL, Decimal("2"))
        add_price(db, BUDGET_MODEL, Decimal("1000"))
        providers = workdir / "reliability-providers.yaml"
        providers.write_text(
            providers_yaml(upstream)
            + f"""
  - name: refused
    base_url: http://127.0.0.1:{free_port()}/v1
    api_key_env: MOCK_PROVIDER_KEY
    models: ["refused/*"]
    stream_usage: inject
"""
        )
        settings = meterline_settings(
            **REAL_TIERS,
            METERLINE_MAX_REQUEST_BODY_BYTES=str(LIMIT_BYTES),
            METERLINE_LOG_LEVEL="debug",
            METERLINE_PROVIDERS=str(providers),
            METERLINE_UPSTREAM_READ_TIMEOUT_S="2",
        )
        with start_meterline(url, upstream, workdir, **settings) as server:
            yield server
