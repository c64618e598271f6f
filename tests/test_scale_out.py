"""Scale-out as deployed (compose.yaml), on loopback without containers: HAProxy running the
committed `deploy/haproxy.cfg` in front of two `meterline serve` replicas of two workers
each, sharing one Postgres database and one Redis.

- Under a steady load through HAProxy one replica is SIGKILLed (server and workers at once,
  as a container is killed) and restarted on its data directory, so its journal is
  recovered. Printed (`pytest -s`): served, recorded, in flight at the kill, lost and
  duplicated, from the request ids clients got (`x-request-id`) against the ledger's.
- A 60 rpm limit and a monthly budget hold across both replicas (counters in Redis).
"""

from __future__ import annotations

import asyncio
import csv
import io
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.conftest import Upstream
from tests.reliability import (
    BUDGET_MODEL,
    REAL_TIERS,
    Server,
    SteadyLoad,
    add_price,
    burst,
    check_ledger,
    journaled_ids,
    new_customer,
    own_database,
    redis_available,
    redis_namespace,
    wait_for_fresh_window,
    wait_for_rows,
    wait_until_settled,
)
from tests.support import ROOT, Database, free_port, wait_for_http

MODEL = "meta-llama/Llama-3.3-70B-Instruct"
HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hello"}]
HAPROXY_CONFIG = ROOT / "deploy" / "haproxy.cfg"
# Debian's package puts it in /usr/sbin, which not every PATH holds.
HAPROXY = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")

pytestmark = pytest.mark.slow


def _needs(what: str) -> None:
    """Skipped where HAProxy or Redis is missing, but never in CI, which provides both."""
    message = f"the scale-out test needs {what}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


class HAProxy:
    """`haproxy` on the committed configuration, its addresses given by the environment."""

    def __init__(self, replicas: list[Server], workdir: Path) -> None:
        self.port, self.stats_port = free_port(), free_port()
        self.log = workdir / "haproxy.log"
        self.env = {
            **os.environ,
            "METERLINE_LISTEN": f"127.0.0.1:{self.port}",
            "METERLINE_STATS": f"127.0.0.1:{self.stats_port}",
            **{
                f"METERLINE_REPLICA_{i}": f"127.0.0.1:{replica.port}"
                for i, replica in enumerate(replicas, 1)
            },
        }
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> HAProxy:
        check = subprocess.run(
            [str(HAPROXY), "-c", "-q", "-f", str(HAPROXY_CONFIG)],
            env=self.env,
            capture_output=True,
            text=True,
        )
        assert check.returncode == 0, check.stdout + check.stderr
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                [str(HAPROXY), "-db", "-f", str(HAPROXY_CONFIG)],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        wait_for_http(f"{self.url}/healthz", 30, self.process)
        return self

    def _servers(self) -> dict[str, dict[str, str]]:
        """The stats page's row of each replica."""
        text = httpx.get(f"http://127.0.0.1:{self.stats_port}/stats;csv").text
        rows = csv.DictReader(io.StringIO(text.lstrip("# ")))
        return {
            row["svname"]: row
            for row in rows
            if row["pxname"] == "replicas" and row["svname"] not in ("BACKEND", "FRONTEND")
        }

    def server_states(self) -> dict[str, str]:
        """What HAProxy's health checks say of each replica: UP, DOWN, …"""
        return {name: row["status"].split()[0] for name, row in self._servers().items()}

    def wait_for_no_connections(self, server: str, timeout: float = 30.0) -> None:
        """Until HAProxy holds no connection to the server, busy or idle: from then on a
        request for it needs a new one."""
        deadline = time.monotonic() + timeout
        columns = ("used_conn_cur", "idle_conn_cur", "safe_conn_cur")
        while held := sum(int(self._servers()[server][c] or 0) for c in columns):
            assert time.monotonic() < deadline, f"HAProxy still holds {held} to {server}"
            time.sleep(0.005)

    def wait_for_states(self, wanted: dict[str, str], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while (states := self.server_states()) != wanted:
            assert time.monotonic() < deadline, f"HAProxy sees {states}, not {wanted}"
            time.sleep(0.2)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass
class Cluster:
    database: Database
    replicas: list[Server]
    haproxy: HAProxy

    @property
    def v1(self) -> str:
        return f"{self.haproxy.url}/v1"

    def answered_by(self, replica: Server, request_ids: set[str], since: int = 0) -> int:
        """How many of these requests the replica answered, by its access log (from byte
        `since` of the log on)."""
        text = replica.log.read_bytes()[since:].decode(errors="replace")
        found = re.findall(r"logger=meterline\.access event=request request_id=(\S+)", text)
        return len(request_ids.intersection(found))


ALL_UP = {"meterline-1": "UP", "meterline-2": "UP"}


def unflushed(database: Database, replica: Server) -> set[str]:
    """Request ids in the replica's journals that are not in the ledger yet."""
    journaled = journaled_ids(replica)
    stored = database.fetch(
        "SELECT request_id FROM usage_ledger WHERE request_id = ANY($1)", list(journaled)
    )
    return journaled - {r["request_id"] for r in stored}


@pytest.fixture(scope="module")
def cluster(
    postgres_server: str,
    template_database: str,
    upstream: Upstream,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Cluster]:
    """Everything started here is stopped here, whatever the tests did."""
    if HAPROXY is None:
        _needs("HAProxy (apt-get install -y haproxy)")
    if not redis_available():
        _needs("Redis at 127.0.0.1:6379")
    workdir = tmp_path_factory.mktemp("scale-out")
    with (
        own_database(postgres_server, template_database) as url,
        redis_namespace() as redis,
    ):
        database = Database(url)
        add_price(database, BUDGET_MODEL, Decimal("1000"))
        settings = {
            **REAL_TIERS,
            **redis,
            # Two replicas of two workers on a Postgres other work shares: small pools.
            "METERLINE_DB_POOL_SIZE": "3",
            # Batches leave memory every second: at the kill, the last second of usage is
            # in the killed workers' journals only.
            "METERLINE_LEDGER_FLUSH_INTERVAL_S": "1",
        }
        replicas = [
            Server(url, upstream, workdir / f"replica-{i}", "--workers", "2", **settings)
            for i in (1, 2)
        ]
        haproxy: HAProxy | None = None
        try:
            for replica in replicas:
                replica.start()
            haproxy = HAProxy(replicas, workdir).start()
            haproxy.wait_for_states(ALL_UP)
            yield Cluster(database, replicas, haproxy)
        finally:
            if haproxy is not None:
                haproxy.stop()
            for replica in replicas:
                replica.stop()


def test_a_replica_killed_under_load_loses_nothing_and_bills_nothing_twice(
    cluster: Cluster,
) -> None:
    victim, survivor = cluster.replicas
    account_id, _, key = new_customer(cluster.haproxy.url, tier="custom")  # no rate limit
    # Streams of 10 chunks 50 ms apart: half a second each, so some are cut by the kill.
    load = SteadyLoad(cluster.v1, key, MODEL, rate=20, chunks=10, chunk_delay_ms=50).start()
    time.sleep(4)
    # Kill while the victim holds rows in its journals (and memory) only, not yet in Postgres.
    deadline = time.monotonic() + 5
    while not unflushed(cluster.database, victim) and time.monotonic() < deadline:
        time.sleep(0.05)
    kill_started = time.monotonic()
    victim.kill()
    # Until HAProxy has seen every connection to it close, it may still write a request on
    # one it keeps alive (and the client sees that connection closed, as from a single
    # server). After that, a request for it needs a new connection: refused, redispatched.
    cluster.haproxy.wait_for_no_connections("meterline-1")
    killed_at = time.monotonic()
    only_in_journal = unflushed(cluster.database, victim)
    cluster.haproxy.wait_for_states({"meterline-1": "DOWN", "meterline-2": "UP"})
    down_s = time.monotonic() - killed_at
    time.sleep(2)
    restart_offset = victim.log.stat().st_size
    victim.start()  # same port, same data directory: its journal is replayed at start
    cluster.haproxy.wait_for_states(ALL_UP)
    time.sleep(4)
    outcomes = load.stop()

    wait_until_settled(cluster.database, account_id)
    check = check_ledger(cluster.database, account_id, outcomes)
    in_flight = [o for o in outcomes if o.started < killed_at and o.finished > kill_started]
    failed = [o for o in outcomes if not o.served]
    # Failed for another reason than being on the killed replica at that instant.
    failed_otherwise = [o for o in failed if o not in in_flight]
    ids = {o.request_id for o in outcomes if o.served and o.request_id}
    recorded_ids = {
        r["request_id"]
        for r in cluster.database.fetch(
            "SELECT request_id FROM usage_ledger WHERE account_id = $1", account_id
        )
    }
    after_restart = cluster.answered_by(victim, ids, since=restart_offset)
    print(
        f"\n[HAProxy, 2 replicas x 2 workers, one SIGKILLed and restarted] sent={len(outcomes)}"
        f" served={check.served} recorded={check.recorded} in_flight_at_kill={len(in_flight)}"
        f" failed={len(failed)} only_in_journal_at_kill={len(only_in_journal)}"
        f" lost={check.lost} duplicated={check.duplicated}"
        f" wrong_tokens={check.wrong_tokens} unanswered_recorded={check.unanswered_recorded}"
        f" connections_gone_after_ms={(killed_at - kill_started) * 1000:.0f}"
        f" marked_down_after_s={down_s:.1f} served_by_restarted_replica={after_restart}"
        f" served_by_survivor={cluster.answered_by(survivor, ids)}"
    )
    assert in_flight, "the kill should catch requests in flight"
    assert check.served <= check.recorded <= check.served + len(in_flight)
    assert check.lost == 0
    assert check.duplicated == 0
    assert check.wrong_tokens == 0
    assert check.unanswered_recorded <= len(in_flight)
    # The restarted replica replayed what its killed workers had only in their journals.
    assert only_in_journal <= recorded_ids
    # Only requests cut by the kill failed: new ones found the surviving replica, the ones
    # sent to the dead one before its health checks failed were redispatched (never sent).
    assert not failed_otherwise, [
        (o.status, o.error, o.stream, o.started - kill_started, o.finished - kill_started)
        for o in failed_otherwise[:5]
    ]
    assert after_restart > 0, "the restarted replica should serve again"


def _split(results: list[Any]) -> tuple[list[Any], list[openai.APIStatusError]]:
    served = [r for r in results if not isinstance(r, openai.APIStatusError)]
    refused = [r for r in results if isinstance(r, openai.APIStatusError)]
    return served, refused


def _request_ids(results: list[Any]) -> set[str]:
    return {
        (r.response if isinstance(r, openai.APIStatusError) else r).headers["x-request-id"]
        for r in results
    }


def test_sixty_requests_a_minute_across_both_replicas(cluster: Cluster) -> None:
    cluster.haproxy.wait_for_states(ALL_UP)
    account_id, _, key = new_customer(cluster.haproxy.url)  # basic tier: 60 a minute
    wait_for_fresh_window(needed_s=20)
    results = asyncio.run(burst(cluster.v1, key, 100, model=MODEL, messages=HELLO))
    served, refused = _split(results)
    ids = _request_ids(served)
    time.sleep(0.5)  # access lines are written every 100 ms
    per_replica = [cluster.answered_by(r, ids) for r in cluster.replicas]
    recorded = wait_for_rows(
        cluster.database,
        "SELECT count(*) FROM usage_ledger WHERE account_id = $1",
        account_id,
        count=len(served),
    )
    print(
        f"\n[60 rpm across 2 replicas x 2 workers] sent=100 served={len(served)}"
        f" (replica 1: {per_replica[0]}, replica 2: {per_replica[1]}) refused={len(refused)}"
        f" recorded={recorded}"
    )
    assert len(served) <= 60
    assert len(served) >= 55  # the limit is shared, not a tenth of it
    assert all(per_replica), "both replicas should have served some"
    assert sum(per_replica) == len(served)
    assert all(e.status_code == 429 for e in refused)
    assert {e.code for e in refused} == {"rate_limit_exceeded"}
    assert recorded == len(served)


def test_a_monthly_budget_holds_across_both_replicas(cluster: Cluster) -> None:
    cluster.haproxy.wait_for_states(ALL_UP)
    max_tokens = 16
    # $1,000 per million tokens; the worst case of one request is its prompt estimate
    # (4 per message + 1 for "Hello") plus max_tokens.
    worst_case = (4 + 1 + max_tokens) * Decimal(1000) / 1_000_000
    budget = 10 * worst_case
    account_id, _, key = new_customer(
        cluster.haproxy.url, tier="custom", monthly_budget_usd=str(budget)
    )
    results = asyncio.run(
        burst(
            cluster.v1,
            key,
            60,
            model=BUDGET_MODEL,
            messages=HELLO,
            max_tokens=max_tokens,
            extra_body={"mock": {"delay_ms": 300}},  # all of them in flight at once
        )
    )
    served, refused = _split(results)
    time.sleep(0.5)
    # Served or refused: each replica checked part of the requests against the one budget.
    answered = [cluster.answered_by(r, _request_ids(results)) for r in cluster.replicas]
    per_replica = [cluster.answered_by(r, _request_ids(served)) for r in cluster.replicas]
    wait_for_rows(
        cluster.database,
        "SELECT count(*) FROM usage_ledger WHERE account_id = $1",
        account_id,
        count=len(served),
    )
    spent = Decimal(
        cluster.database.fetchval(
            "SELECT COALESCE(SUM(cost_usd), 0) FROM usage_ledger WHERE account_id = $1",
            account_id,
        )
    )
    print(
        f"\n[budget across 2 replicas x 2 workers] budget={budget} worst_case={worst_case}"
        f" sent=60 (replica 1: {answered[0]}, replica 2: {answered[1]}) served={len(served)}"
        f" (replica 1: {per_replica[0]}, replica 2: {per_replica[1]}) refused={len(refused)}"
        f" spent={spent}"
    )
    assert spent <= budget
    assert 1 <= len(served) <= 10
    assert all(answered), "both replicas should have taken part"
    assert {(e.status_code, e.code) for e in refused} == {(429, "insufficient_quota")}
