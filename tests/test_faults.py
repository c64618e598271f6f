"""Zero lost usage under faults, proven with real processes and real signals.

Each test runs `meterline serve` against a Postgres of its own (pgserver in a temporary
folder, which the test stops and starts: never the shared server), drives it with a steady
load of plain and streamed requests through the `openai` SDK, breaks something, and then
compares the ledger with what the clients saw. The counts are printed (`pytest -s`):

    served       requests whose client got a whole 200 answer
    recorded     ledger rows of the account
    lost         served requests missing from the ledger (must be 0)
    duplicated   rows beyond one per request id (must be 0)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Upstream
from tests.reliability import (
    Outcome,
    Server,
    SteadyLoad,
    StoppablePostgres,
    admin,
    check_ledger,
    journaled_ids,
    new_customer,
    wait_until_settled,
)
from tests.support import Database

MODEL = "meta-llama/Llama-3.3-70B-Instruct"
HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hello"}]
OUTAGE_S = 30.0

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def postgres() -> Iterator[StoppablePostgres]:
    # Not under pytest's temporary root: pytest keeps that private to root (0700), and when
    # run as root pgserver runs Postgres as another user, which must reach its folder.
    root = Path(tempfile.mkdtemp(prefix="meterline-faults-"))
    server = StoppablePostgres(root)
    server.start()
    try:
        yield server
    finally:
        server.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def db(postgres: StoppablePostgres) -> Database:
    return Database(postgres.url)


@pytest.fixture
def servers(
    postgres: StoppablePostgres, upstream: Upstream, tmp_path: Path
) -> Iterator[list[Server]]:
    """Servers a test makes (append to the list); each is stopped afterwards."""
    made: list[Server] = []
    yield made
    for server in made:
        server.stop()


def new_server(
    servers: list[Server],
    postgres: StoppablePostgres,
    upstream: Upstream,
    workdir: Path,
    *args: str,
) -> Server:
    server = Server(postgres.url, upstream, workdir, *args)
    servers.append(server)
    return server


def wait_for_empty_spool(server: Server, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while server.spooled():
        assert time.monotonic() < deadline, f"spool not replayed: {server.spooled()}"
        time.sleep(0.2)


def test_postgres_down_for_30_seconds_under_steady_load(
    postgres: StoppablePostgres,
    upstream: Upstream,
    servers: list[Server],
    db: Database,
    tmp_path: Path,
) -> None:
    server = new_server(servers, postgres, upstream, tmp_path).start()
    account_id, _, key = new_customer(server.url)
    load = SteadyLoad(server.v1, key, MODEL, rate=20).start()
    time.sleep(2)

    postgres.stop()
    down_at = time.monotonic()
    time.sleep(2)
    health = httpx.get(f"{server.url}/healthz").json()
    assert health == {"status": "degraded", "database": "unavailable"}
    spooled_during_outage = len(server.spooled())
    time.sleep(OUTAGE_S - 2)
    postgres.restart()
    up_at = time.monotonic()
    time.sleep(3)
    outcomes = load.stop()

    wait_for_empty_spool(server)
    wait_until_settled(db, account_id)
    check = check_ledger(db, account_id, outcomes)
    during = [o for o in outcomes if o.served and down_at < o.started and o.finished < up_at]
    failed = [o for o in outcomes if not o.served]
    print(
        "\n"
        + check.line(f"Postgres down {OUTAGE_S:.0f} s")
        + f" sent={len(outcomes)} served_during_outage={len(during)}"
        f" spool_files_during_outage={spooled_during_outage} failed={len(failed)}"
    )
    # The proxy kept serving throughout, from memory, spooling what it could not write.
    assert not failed, [(o.status, o.error) for o in failed[:5]]
    assert len(during) >= OUTAGE_S * 20 * 0.5
    assert spooled_during_outage > 0
    # Afterwards the ledger holds exactly one row per served request, with its tokens.
    assert check.lost == 0
    assert check.duplicated == 0
    assert check.wrong_tokens == 0
    assert check.recorded == check.served == len(outcomes)


def test_sigterm_under_load_finishes_in_flight_requests_and_drains(
    postgres: StoppablePostgres,
    upstream: Upstream,
    servers: list[Server],
    db: Database,
    tmp_path: Path,
) -> None:
    server = new_server(servers, postgres, upstream, tmp_path, "--workers", "2").start()
    account_id, _, key = new_customer(server.url)
    # Streams of 20 chunks 50 ms apart: a second each, so many are in flight at the signal.
    load = SteadyLoad(server.v1, key, MODEL, rate=30, chunks=20, chunk_delay_ms=50).start()
    time.sleep(3)
    server.signal(signal.SIGTERM)
    term_at = time.monotonic()
    code = server.wait(60)
    stopped_at = time.monotonic()
    outcomes = load.stop()

    in_flight = [o for o in outcomes if o.started < term_at < o.finished and o.status is not None]
    cut = [o for o in in_flight if not o.served]
    check = check_ledger(db, account_id, outcomes)
    print(
        "\n"
        + check.line("SIGTERM, 2 workers")
        + f" in_flight_at_signal={len(in_flight)} cut={len(cut)}"
        f" shutdown_s={stopped_at - term_at:.1f} exit_code={code}"
    )
    assert code == 0
    assert in_flight, "the test should catch requests in flight"
    assert not cut, "in-flight requests must finish"
    # The queue was drained into Postgres before the process exited: nothing left behind.
    assert not server.spooled()
    assert check.lost == 0
    assert check.duplicated == 0
    assert check.wrong_tokens == 0
    assert check.unanswered_recorded == 0
    assert check.recorded == check.served


def _save_spool(server: Server, to: Path) -> list[Path]:
    """Copies of the spooled batches under their own names (claims stripped)."""
    to.mkdir()
    saved = []
    for path in server.spooled():
        name = path.name.split(".claim-")[0]
        if name.endswith(".jsonl"):
            saved.append(Path(shutil.copy(path, to / name)))
    return saved


def _totals(db: Database, account_id: object) -> tuple[int, int, int]:
    row = db.fetch(
        "SELECT count(*) AS n, COALESCE(sum(prompt_tokens), 0) AS p, "
        "COALESCE(sum(completion_tokens), 0) AS c FROM usage_ledger WHERE account_id = $1",
        account_id,
    )[0]
    return int(row["n"]), int(row["p"]), int(row["c"])


def test_sigkill_under_load_then_restart_and_the_same_spool_replayed_twice(
    postgres: StoppablePostgres,
    upstream: Upstream,
    servers: list[Server],
    db: Database,
    tmp_path: Path,
) -> None:
    """Killed while Postgres is down, so the spool is the only copy of recent usage."""
    workdir = tmp_path / "server"
    server = new_server(servers, postgres, upstream, workdir).start()
    account_id, _, key = new_customer(server.url)
    load = SteadyLoad(server.v1, key, MODEL, rate=20).start()
    time.sleep(1.5)
    postgres.stop()
    try:
        time.sleep(3)
        server.signal(signal.SIGKILL)
        killed_at = time.monotonic()
        server.wait(30)
        outcomes = load.stop()
        saved = _save_spool(server, tmp_path / "saved")
    finally:
        postgres.restart()

    # Start-up replays what the crash left in the spool.
    restarted = new_server(servers, postgres, upstream, workdir).start()
    wait_for_empty_spool(restarted)
    wait_until_settled(db, account_id)
    check = check_ledger(db, account_id, outcomes)
    # The writer flushes every 50 ms here: a request acknowledged a second before the kill
    # was in the spool (fsynced) by then; only the last instants may be missing.
    settled = [o for o in outcomes if o.served and o.finished < killed_at - 1.0]
    recorded_ids = {
        r["request_id"]
        for r in db.fetch("SELECT request_id FROM usage_ledger WHERE account_id = $1", account_id)
    }
    lost = [o for o in settled if o.request_id not in recorded_ids]
    last_instants = [
        o for o in outcomes if o.served and o not in settled and o.request_id not in recorded_ids
    ]
    print(
        f"\n[SIGKILL with Postgres down, restart] served={check.served}"
        f" recorded={check.recorded} acknowledged_before_last_flush={len(settled)}"
        f" lost={len(lost)} duplicated={check.duplicated} wrong_tokens={check.wrong_tokens}"
        f" missing_from_last_second={len(last_instants)} spool_files={len(saved)}"
    )
    assert saved, "usage of the outage should have been spooled"
    assert not lost
    assert check.duplicated == 0
    assert check.wrong_tokens == 0

    # The same spool replayed a second time changes nothing.
    before = _totals(db, account_id)
    for path in saved:
        shutil.copy(path, restarted.spool / path.name)
    wait_for_empty_spool(restarted)
    time.sleep(0.5)
    after = _totals(db, account_id)
    print(f"[same spool replayed twice] rows/prompt/completion before={before} after={after}")
    assert after == before
    assert (
        not list((restarted.spool / "rejected").glob("*"))
        if (restarted.spool / "rejected").exists()
        else True
    )


# -- The ledger's durable paths failing themselves -----------------------------------------


@contextmanager
def no_new_files(directory: Path) -> Iterator[None]:
    """No file can be created in `directory` (those open stay writable; subfolders too).

    Permissions do that unless the tests run as root, who ignores them: then the immutable
    attribute (`chattr +i`), which root obeys, on file systems that support it.
    """
    as_root = os.geteuid() == 0
    if as_root:
        if subprocess.run(["chattr", "+i", str(directory)], capture_output=True).returncode:
            pytest.skip("needs a file system with the immutable attribute (chattr)")
    else:
        mode = directory.stat().st_mode
        directory.chmod(0o555)
    try:
        probe = directory / "probe"
        with contextlib.suppress(OSError), open(probe, "wb"):
            probe.unlink()
            pytest.skip("cannot make the folder refuse new files here")
        yield
    finally:
        if as_root:
            subprocess.run(["chattr", "-i", str(directory)], check=True)
        else:
            directory.chmod(mode)


def ledger_errors(server: Server, step: str) -> float:
    for family in text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text):
        for sample in family.samples:
            if sample.name == "meterline_ledger_errors_total" and sample.labels == {"step": step}:
                return sample.value
    return 0.0


def known_key(server: Server) -> tuple[uuid.UUID, str]:
    """A new customer whose key the server has seen once (cached: it serves without Postgres)."""
    account_id, _, key = new_customer(server.url)
    client = openai.OpenAI(base_url=server.v1, api_key=key, max_retries=0)
    client.models.list()
    return account_id, key


def serve_for(server: Server, key: str, seconds: float, rate: float = 50) -> list[Outcome]:
    load = SteadyLoad(server.v1, key, MODEL, rate=rate, chunks=4, chunk_delay_ms=5).start()
    time.sleep(seconds)
    return load.stop()


def test_postgres_down_and_spool_unwritable_then_killed_loses_no_served_request(
    postgres: StoppablePostgres,
    upstream: Upstream,
    servers: list[Server],
    db: Database,
    tmp_path: Path,
) -> None:
    """Nothing takes the rows but memory and the journal: the journal must keep them."""
    workdir = tmp_path / "server"
    server = new_server(servers, postgres, upstream, workdir).start()
    account_id, key = known_key(server)
    postgres.stop()
    try:
        with no_new_files(server.spool):
            outcomes = serve_for(server, key, 2.0)
            time.sleep(2.0)  # flushes keep failing: Postgres down, the spool refusing files
            kept = journaled_ids(server)
            served = {o.request_id for o in outcomes if o.served}
            print(f"\n[Postgres down, spool refusing] served={len(served)} journaled={len(kept)}")
            assert served <= kept, "the journal must keep every row not stored elsewhere"
            assert len(served) >= 40 and not [o for o in outcomes if not o.served]
            assert ledger_errors(server, "spool") > 0
            server.signal(signal.SIGKILL)
            server.wait(30)
    finally:
        postgres.restart()
    restarted = new_server(servers, postgres, upstream, workdir).start()
    wait_for_empty_spool(restarted)
    wait_until_settled(db, account_id)
    check = check_ledger(db, account_id, outcomes)
    print(check.line("killed, restarted"))
    assert check.lost == 0 and check.duplicated == 0 and check.wrong_tokens == 0
    assert check.recorded == check.served


def test_rows_nothing_could_store_reach_the_ledger_once_the_spool_and_postgres_are_back(
    postgres: StoppablePostgres,
    upstream: Upstream,
    servers: list[Server],
    db: Database,
    tmp_path: Path,
) -> None:
    server = new_server(servers, postgres, upstream, tmp_path).start()
    account_id, key = known_key(server)
    postgres.stop()
    try:
        with no_new_files(server.spool):
            outcomes = serve_for(server, key, 2.0)
            time.sleep(1.5)
            assert not server.spooled()
        # The spool takes files again, Postgres is still down: the rows go there.
        deadline = time.monotonic() + 10
        while not server.spooled():
            assert time.monotonic() < deadline, "the rows kept in memory were never spooled"
            time.sleep(0.1)
    finally:
        postgres.restart()
    wait_for_empty_spool(server)
    wait_until_settled(db, account_id)
    check = check_ledger(db, account_id, outcomes)
    print("\n" + check.line("spool refusing, then back"))
    assert check.lost == 0 and check.duplicated == 0 and check.wrong_tokens == 0
    assert check.recorded == check.served == len(outcomes)
    # Everything is stored: the segments that guarded those rows are gone.
    time.sleep(1.0)
    assert len(list((server.spool / "journal").glob("*.journal"))) <= 1


def test_a_journal_segment_that_cannot_be_created_does_not_stop_the_ledger(
    postgres: StoppablePostgres,
    upstream: Upstream,
    servers: list[Server],
    db: Database,
    tmp_path: Path,
) -> None:
    """Each flush starts a new segment; here none can be made (the journal folder replaced
    by a file: ENOTDIR, as EMFILE or ENOSPC would be): rows still reach Postgres."""
    server = new_server(servers, postgres, upstream, tmp_path).start()
    account_id, key = known_key(server)
    journal = server.spool / "journal"
    aside = server.spool / "journal-aside"
    journal.rename(aside)  # the open segment moves with it, and stays writable
    journal.write_bytes(b"")
    try:
        broken = serve_for(server, key, 1.5, rate=20)
        assert wait_until_settled(db, account_id, timeout=20) == len(broken)
        assert ledger_errors(server, "journal") > 0
        assert "event=journal_segment_failed" in server.log.read_text()
        # The one segment kept all along holds every row since the failure.
        kept = {o.request_id for o in broken} - {None}
        assert kept <= {
            line.split(b'"request_id":"', 1)[1].split(b'"', 1)[0].decode()
            for path in aside.glob("*.journal")
            for line in path.read_bytes().splitlines()
        }
    finally:
        journal.unlink()
        aside.rename(journal)
    healed = serve_for(server, key, 1.5, rate=20)
    outcomes = broken + healed
    assert wait_until_settled(db, account_id, timeout=20) == len(outcomes)
    check = check_ledger(db, account_id, outcomes)
    print("\n" + check.line("journal segment refused, then back"))
    assert check.lost == 0 and check.duplicated == 0 and check.wrong_tokens == 0
    time.sleep(1.0)
    assert len(list(journal.glob("*.journal"))) <= 1  # the kept segment went once stored


# -- One customer's bad input and a provider's absurd usage cost no other customer a row ----

NUL_MODELS = ["mock\x00chat", "meta-llama/Llama-3.3-70B-Instruct\x00", "\x00"]
UNUSABLE_USAGE: list[dict[str, Any]] = [
    {"completion_tokens": "12"},
    {"prompt_tokens": 12.5},
    {"prompt_tokens": -3},
    {"completion_tokens": 1e30},
    {"prompt_tokens": True},
    {"completion_tokens": 2**63},
]
# Absurd but well-formed: stored as claimed (and flagged), so the client's figures are exact.
STORABLE_ABSURD: list[dict[str, Any]] = [
    {"prompt_tokens_details": {"cached_tokens": 3_000_000_000}},
    {"completion_tokens": 4_294_967_295},
    {"prompt_tokens": 2**31, "total_tokens": 2**31 + 4},
]


@dataclass
class Sent:
    account: str  # "victim" | "attacker"
    kind: str
    stream: bool
    status: int | None = None
    request_id: str | None = None
    usage: tuple[int, int, int] | None = None  # prompt, completion, cached: as the client saw


def _plan(rng: random.Random) -> list[tuple[str, str, dict[str, Any], bool]]:
    """500 requests of each account: (account, kind, create arguments, streamed)."""
    plan = []
    for i in range(500):
        stream = i % 2 == 1
        create: dict[str, Any] = {"model": MODEL, "max_tokens": 16, "extra_body": {"mock": {}}}
        kind = "ordinary"
        if i % 5 == 0:
            kind = "absurd"
            create["extra_body"]["mock"]["usage_override"] = STORABLE_ABSURD[i % 3]
        plan.append(("victim", kind, create, stream))
    for i in range(500):
        stream = i % 2 == 1
        mock: dict[str, Any] = {}
        create = {"model": MODEL, "max_tokens": 16, "extra_body": {"mock": mock}}
        kind = ["nul_model", "unusable_usage", "nul_upstream_model", "nul_error_code"][i % 4]
        if kind == "nul_model":
            create["model"] = NUL_MODELS[i % len(NUL_MODELS)]
        elif kind == "unusable_usage":
            mock["usage_override"] = UNUSABLE_USAGE[i % len(UNUSABLE_USAGE)]
        elif kind == "nul_upstream_model":
            mock["model_override"] = "mock\x00chat"
        else:
            mock.update(status=500, error_code="overloaded\x00")
        plan.append(("attacker", kind, create, stream))
    rng.shuffle(plan)
    return plan


async def _send(
    client: openai.AsyncOpenAI, gate: asyncio.Semaphore, sent: Sent, create: dict[str, Any]
) -> None:
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Count me once"}]
    async with gate:
        try:
            if sent.stream:
                async with client.chat.completions.with_streaming_response.create(
                    messages=messages, stream=True, stream_options={"include_usage": True}, **create
                ) as response:
                    sent.status = response.status_code
                    sent.request_id = response.headers.get("x-request-id")
                    async for chunk in await response.parse():
                        if chunk.usage is not None:
                            sent.usage = _seen(chunk.usage)
            else:
                raw = await client.chat.completions.with_raw_response.create(
                    messages=messages, **create
                )
                sent.status, sent.request_id = raw.status_code, raw.headers.get("x-request-id")
                usage = raw.parse().usage
                sent.usage = _seen(usage) if usage is not None else None
        except openai.APIStatusError as error:
            sent.status = error.status_code
            sent.request_id = error.response.headers.get("x-request-id")


def _seen(usage: Any) -> tuple[int, int, int]:
    details = usage.prompt_tokens_details
    cached = details.cached_tokens if details is not None and details.cached_tokens else 0
    return usage.prompt_tokens, usage.completion_tokens, cached


async def _drive(
    base_url: str, keys: dict[str, str], plan: list[tuple[str, str, dict[str, Any], bool]]
) -> list[Sent]:
    clients = {
        account: openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=60)
        for account, key in keys.items()
    }
    gate = asyncio.Semaphore(32)
    sent = [Sent(account, kind, stream) for account, kind, _, stream in plan]
    try:
        await asyncio.gather(
            *(
                _send(clients[s.account], gate, s, create)
                for s, (_, _, create, _) in zip(sent, plan, strict=True)
            )
        )
    finally:
        for client in clients.values():
            await client.close()
    return sent


def test_a_customer_sending_nul_and_absurd_usage_costs_no_other_customer_a_row(
    postgres: StoppablePostgres,
    upstream: Upstream,
    servers: list[Server],
    db: Database,
    tmp_path: Path,
) -> None:
    """1,000 requests of two accounts, mixed in every batch, a third of them spooled during
    an outage and replayed: every row of the victim is in the ledger, tokens exact."""
    server = new_server(servers, postgres, upstream, tmp_path).start()
    victim, victim_key = known_key(server)
    attacker, attacker_key = known_key(server)
    keys = {"victim": victim_key, "attacker": attacker_key}
    plan = _plan(random.Random(10))
    sent = asyncio.run(_drive(server.v1, keys, plan[:400]))
    postgres.stop()
    try:
        sent += asyncio.run(_drive(server.v1, keys, plan[400:700]))
        spooled = len(server.spooled())
    finally:
        postgres.restart()
    sent += asyncio.run(_drive(server.v1, keys, plan[700:]))
    wait_for_empty_spool(server)
    wait_until_settled(db, victim)
    wait_until_settled(db, attacker)

    rows = {
        r["request_id"]: r
        for r in db.fetch(
            "SELECT request_id, account_id, prompt_tokens, completion_tokens, cached_tokens,"
            " usage_source, upstream_model, error_code FROM usage_ledger"
            " WHERE account_id = ANY($1::uuid[])",
            [victim, attacker],
        )
    }
    victims = [s for s in sent if s.account == "victim"]
    mine = {k: r for k, r in rows.items() if r["account_id"] == victim}
    expected = {s.request_id: s.usage for s in victims}
    stored = {
        k: (r["prompt_tokens"], r["completion_tokens"], r["cached_tokens"]) for k, r in mine.items()
    }
    totals = [sum(u[i] for u in expected.values() if u is not None) for i in range(3)]
    print(
        f"\n[two accounts, NUL and absurd usage, outage] sent={len(sent)} spooled_files={spooled}"
        f" victim_served={sum(s.status == 200 for s in victims)} victim_rows={len(mine)}"
        f" victim_tokens(prompt, completion, cached)={totals}"
    )
    assert spooled > 0, "the outage should have spooled mixed batches"
    assert all(s.status == 200 and s.usage is not None for s in victims)
    assert stored == expected  # every victim row, each with exactly the tokens its client saw
    flagged = db.fetchval(
        "SELECT count(*) FROM usage_ledger WHERE account_id = $1 AND usage_flag IS NOT NULL",
        victim,
    )
    assert flagged == 100  # the absurd claims: stored as claimed, flagged for review

    attackers = [s for s in sent if s.account == "attacker"]
    for s in attackers:
        row = rows.get(s.request_id or "")
        if s.kind == "nul_model":
            assert s.status == 400 and row is None
            continue
        assert row is not None and row["account_id"] == attacker, s
        if s.kind == "unusable_usage":
            assert row["usage_source"] == "estimated" and row["prompt_tokens"] > 0
        elif s.kind == "nul_upstream_model":
            assert row["upstream_model"] == "mock\\x00chat"
        else:
            assert (s.status, row["error_code"]) == (500, "overloaded\\x00")
    assert db.fetchval("SELECT count(*) FROM usage_quarantine") == 0


def test_the_billing_api_answers_503_while_postgres_is_down_and_the_proxy_serves_on(
    postgres: StoppablePostgres,
    upstream: Upstream,
    servers: list[Server],
    db: Database,
    tmp_path: Path,
) -> None:
    server = new_server(servers, postgres, upstream, tmp_path).start()
    account_id, _, key = new_customer(server.url)
    period = datetime.now(UTC).strftime("%Y-%m")
    calls: list[tuple[str, str, dict[str, object] | None]] = [
        ("GET", "/billing/accounts", None),
        ("GET", f"/billing/accounts/{account_id}", None),
        ("POST", "/billing/accounts", {"name": "during the outage"}),
        ("POST", f"/billing/accounts/{account_id}/keys", {}),
        ("GET", "/billing/usage?group_by=day", None),
        ("GET", "/billing/usage/events", None),
        ("GET", "/billing/prices", None),
        ("POST", "/billing/invoices", {"account_id": str(account_id), "period": period}),
        ("GET", f"/billing/reports/monthly?period={period}", None),  # streamed: refused first
        ("GET", f"/billing/reports/unpriced?period={period}", None),
    ]
    client = openai.OpenAI(base_url=server.v1, api_key=key, max_retries=0)
    warm = client.chat.completions.with_raw_response.create(model=MODEL, messages=HELLO)
    postgres.stop()
    try:
        with admin(server.url) as billing:
            for method, path, body in calls:
                response = billing.request(method, path, json=body)
                assert response.status_code == 503, (method, path, response.text)
                assert response.json() == {
                    "error": {
                        "message": "the database is unavailable; retry shortly",
                        "type": "api_error",
                        "code": "database_unavailable",
                        "param": None,
                    }
                }
                assert int(response.headers["retry-after"]) > 0
        # A customer key is looked up in Postgres too: the same answer, not a 401 or a 500.
        as_customer = httpx.get(
            f"{server.url}/billing/usage", headers={"Authorization": f"Bearer {key}"}
        )
        assert as_customer.status_code == 503
        assert as_customer.json()["error"]["code"] == "database_unavailable"
        # Meanwhile the proxy serves from memory and spools the usage.
        served = [
            client.chat.completions.with_raw_response.create(model=MODEL, messages=HELLO)
            for _ in range(5)
        ]
        assert [r.status_code for r in served] == [200] * 5
        # A key it has not seen yet cannot be checked: retryable, in OpenAI's shape.
        unseen = openai.OpenAI(base_url=server.v1, api_key="ml-" + "u" * 43, max_retries=0)
        with pytest.raises(openai.APIStatusError) as refused:
            unseen.chat.completions.create(model=MODEL, messages=HELLO)
        assert refused.value.status_code == 503
        assert refused.value.code == "database_unavailable"
        assert int(refused.value.response.headers["retry-after"]) > 0
        assert wait_for_spool(server), "usage of the outage should go to the spool"
    finally:
        postgres.restart()

    # Back: the billing API answers again and the served requests reached the ledger.
    wait_for_empty_spool(server)
    with admin(server.url) as billing:
        assert billing.get(f"/billing/accounts/{account_id}").status_code == 200
    ids = {r.headers["x-request-id"] for r in [warm, *served]}
    recorded = db.fetch("SELECT request_id FROM usage_ledger WHERE account_id = $1", account_id)
    assert {r["request_id"] for r in recorded} == ids


def wait_for_spool(server: Server, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not server.spooled():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True
