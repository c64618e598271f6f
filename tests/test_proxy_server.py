"""The proxy under conditions that need a server of their own: unreachable and slow
providers, several workers, a graceful shutdown with records still in memory, and a
start-up after a crash that left records in the spool."""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from service.ledger.record import LedgerRecord, new_request_id
from service.ledger.spool import Spool
from tests.conftest import Meterline, Upstream, meterline_env, providers_yaml, start_meterline
from tests.support import Database, free_port, running
from tests.test_proxy import HELLO, PRICED, account_rows, ledger_row


@pytest.fixture(scope="module")
def edge(
    database_url: str, upstream: Upstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Meterline]:
    """A server with an unreachable provider and a 0.5 s read timeout."""
    workdir = tmp_path_factory.mktemp("edge")
    providers = workdir / "edge-providers.yaml"
    providers.write_text(
        providers_yaml(upstream)
        + f"""
  - name: dead
    base_url: http://127.0.0.1:{free_port()}/v1
    api_key_env: MOCK_PROVIDER_KEY
    models: ["dead/*"]
    stream_usage: inject
"""
    )
    with start_meterline(
        database_url,
        upstream,
        workdir,
        METERLINE_PROVIDERS=str(providers),
        METERLINE_UPSTREAM_READ_TIMEOUT_S="0.5",
        METERLINE_UPSTREAM_CONNECT_RETRIES="2",
    ) as server:
        yield server


@pytest.mark.parametrize("stream", [False, True])
def test_unreachable_provider_is_502_after_retries(
    edge: Meterline, db: Database, stream: bool
) -> None:
    _, key = edge.customer()
    client = openai.OpenAI(base_url=edge.v1, api_key=key, max_retries=0)
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="dead/chat", messages=HELLO, stream=stream)
    assert caught.value.status_code == 502
    assert caught.value.code == "upstream_unavailable"
    row = ledger_row(db, caught.value.response.headers["x-request-id"])
    assert (row["status_code"], row["error_code"], row["provider"]) == (
        502,
        "upstream_unavailable",
        "dead",
    )
    assert "connect_retry attempt=2" in edge.log.read_text()


def test_slow_provider_is_504(edge: Meterline, db: Database) -> None:
    _, key = edge.customer()
    client = openai.OpenAI(base_url=edge.v1, api_key=key, max_retries=0)
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(
            model=PRICED, messages=HELLO, extra_body={"mock": {"delay_ms": 1500}}
        )
    assert caught.value.status_code == 504
    row = ledger_row(db, caught.value.response.headers["x-request-id"])
    assert (row["status_code"], row["error_code"]) == (504, "upstream_timeout")


def test_stream_stalling_midway_is_a_504_row_with_what_was_generated(
    edge: Meterline, db: Database
) -> None:
    _, key = edge.customer()
    client = openai.OpenAI(base_url=edge.v1, api_key=key, max_retries=0)
    stream = client.chat.completions.create(
        model=PRICED,
        messages=HELLO,
        stream=True,
        extra_body={"mock": {"chunks": 4, "chunk_delay_ms": 1000}},
    )
    with pytest.raises(openai.APIError, match="stopped sending"):
        for _ in stream:
            pass
    row = ledger_row(db, stream.response.headers["x-request-id"])
    assert (row["status_code"], row["error_code"]) == (504, "upstream_timeout")
    assert row["usage_source"] == "estimated" and row["prompt_tokens"] > 0


def test_provider_keys_never_reach_the_client_or_the_log(edge: Meterline) -> None:
    from tests.conftest import PROVIDER_KEY

    _, key = edge.customer()
    response = httpx.post(
        f"{edge.v1}/chat/completions",
        json={"model": PRICED, "messages": HELLO},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert PROVIDER_KEY not in response.text + str(response.headers)
    assert PROVIDER_KEY not in edge.log.read_text()
    assert key not in edge.log.read_text()


def test_two_workers_record_every_request(
    database_url: str, upstream: Upstream, tmp_path: Path, db: Database
) -> None:
    with start_meterline(database_url, upstream, tmp_path, "--workers", "2") as server:
        account_id, key = server.customer()

        async def run() -> list[str]:
            client = openai.AsyncOpenAI(base_url=server.v1, api_key=key, max_retries=0)
            raws = await asyncio.gather(
                *(
                    client.chat.completions.with_raw_response.create(model=PRICED, messages=HELLO)
                    for _ in range(120)
                )
            )
            await client.close()
            return [raw.headers["x-request-id"] for raw in raws]

        request_ids = asyncio.run(run())
        rows = account_rows(db, account_id, 120)
        assert len(set(request_ids)) == 120
        assert sorted(r["request_id"] for r in rows) == sorted(request_ids)


def _connections(process: psutil.Process, port: int, status: str) -> int:
    return sum(
        1 for c in process.net_connections("tcp") if c.laddr.port == port and c.status == status
    )


def _workers(supervisor: psutil.Process) -> list[psutil.Process]:
    """uvicorn's worker processes (multiprocessing's spawned children), not its helpers."""
    return [p for p in supervisor.children() if "--multiprocessing-fork" in p.cmdline()]


def test_workers_each_listen_and_share_a_burst_of_connections_evenly(
    database_url: str, upstream: Upstream, tmp_path: Path
) -> None:
    """A client pool opening its connections at once: shared by uvicorn's one socket, the
    first worker awake took two thirds of them (and kept them); each worker listening on
    its own socket, the kernel spreads them."""
    with start_meterline(database_url, upstream, tmp_path, "--workers", "2") as server:
        port = int(server.url.rsplit(":", 1)[1])
        supervisor = psutil.Process(server.pid)
        workers = _workers(supervisor)
        assert len(workers) == 2
        # Only the workers listen: none of the port's connections can queue where no
        # worker accepts them (a worker that dies takes its socket with it).
        assert _connections(supervisor, port, psutil.CONN_LISTEN) == 0
        assert [_connections(w, port, psutil.CONN_LISTEN) for w in workers] == [1, 1]

        burst = [socket.create_connection(("127.0.0.1", port)) for _ in range(200)]
        try:
            deadline = time.monotonic() + 10
            while True:
                held = [_connections(w, port, psutil.CONN_ESTABLISHED) for w in workers]
                if sum(held) == 200 or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
        finally:
            for connection in burst:
                connection.close()
        assert sum(held) == 200
        # By hash, each worker's share of 200 is 100 ± 7 (one standard deviation).
        assert all(70 <= n <= 130 for n in held), held

        # A worker killed: its socket goes with it, the other serves every new connection
        # at once, and the supervisor starts a replacement that listens again.
        workers[0].kill()
        workers[0].wait(10)
        for _ in range(20):
            assert httpx.get(f"{server.url}/healthz", timeout=5).status_code == 200
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            replacements = [w for w in _workers(supervisor) if w.pid != workers[1].pid]
            if replacements and _connections(replacements[0], port, psutil.CONN_LISTEN) == 1:
                break
            time.sleep(0.2)
        else:
            raise AssertionError("no replacement worker listened within 60 s")


def _spooled_record(account_id: uuid.UUID) -> LedgerRecord:
    return LedgerRecord(
        request_id=new_request_id(),
        occurred_at=datetime.now(UTC),
        account_id=account_id,
        key_id=None,
        task_id="crash",
        task_type=None,
        endpoint="chat",
        requested_model=PRICED,
        upstream_model=PRICED,
        provider="mock",
        stream=False,
        status_code=200,
        error_code=None,
        prompt_tokens=11,
        completion_tokens=22,
        total_tokens=33,
        cached_tokens=0,
        reasoning_tokens=0,
        usage_source="upstream",
        latency_ms=3,
        ttft_ms=None,
        cost_usd=None,
        price_version_id=None,
    )


def test_start_up_replays_the_spool_and_shutdown_drains_the_queue(
    database_url: str, upstream: Upstream, tmp_path: Path, db: Database
) -> None:
    """What a crash left in the spool is in the ledger after the next start; what is still in
    memory at SIGTERM (the writer would only flush in a minute) is there after the stop."""
    account_id = uuid.uuid4()
    spool = Spool(tmp_path / "data" / "spool")
    left = [_spooled_record(account_id) for _ in range(5)]
    spool.write([r.to_json() for r in left[:3]])
    claimed_by_dead = spool.claim(spool.write([r.to_json() for r in left[3:]]))
    assert claimed_by_dead is not None
    os.rename(claimed_by_dead, str(claimed_by_dead).rsplit("-", 1)[0] + "-999999999")

    slow_flush = {
        "METERLINE_LEDGER_FLUSH_INTERVAL_S": "60",
        "METERLINE_LEDGER_BATCH_SIZE": "100000",
    }
    with start_meterline(database_url, upstream, tmp_path, **slow_flush) as server:
        assert len(account_rows(db, account_id, 5)) == 5
        customer, key = server.customer()
        client = openai.OpenAI(base_url=server.v1, api_key=key, max_retries=0)
        for _ in range(30):
            client.chat.completions.create(model=PRICED, messages=HELLO)
        assert db.fetchval("SELECT count(*) FROM usage_ledger WHERE account_id = $1", customer) == 0
    # The context exit sent SIGTERM and waited for the process.
    assert db.fetchval("SELECT count(*) FROM usage_ledger WHERE account_id = $1", customer) == 30
    assert spool.pending() == []


def test_sigkill_loses_only_requests_in_flight(
    database_url: str, upstream: Upstream, tmp_path: Path, db: Database
) -> None:
    """Answered requests whose records were still in memory (the writer would only flush in
    a minute) are in the ledger after a SIGKILL and a restart: the journal kept them."""
    slow_flush = {
        "METERLINE_LEDGER_FLUSH_INTERVAL_S": "60",
        "METERLINE_LEDGER_BATCH_SIZE": "100000",
    }
    providers = tmp_path / "providers.yaml"
    providers.write_text(providers_yaml(upstream))
    env = {**meterline_env(database_url, tmp_path / "data", providers), **slow_flush}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with running(["serve", "--port", str(port)], f"{url}/healthz", env=env) as process:
        server = Meterline(
            url, database_url, tmp_path / "data", tmp_path / "unused.log", process.pid
        )
        account_id, key = server.customer()
        client = openai.OpenAI(base_url=server.v1, api_key=key, max_retries=0)
        for _ in range(25):
            client.chat.completions.create(model=PRICED, messages=HELLO)
        assert (
            db.fetchval("SELECT count(*) FROM usage_ledger WHERE account_id = $1", account_id) == 0
        )
        process.kill()
        process.wait()
    with running(["serve", "--port", str(port)], f"{url}/healthz", env=env):
        rows = account_rows(db, account_id, 25)
    assert len(rows) == 25
    assert all(r["status_code"] == 200 and r["total_tokens"] > 0 for r in rows)
