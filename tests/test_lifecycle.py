"""Background work and the process's start: a job outlives its failures and stops when told;
a start that fails half-way leaves nothing running."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from service.app import YOUNG_COLLECTION_THRESHOLD, create_app
from service.db.engine import asyncpg_dsn
from service.lifecycle import Periodic
from service.runtime import Runtime
from service.settings import Settings

log = logging.getLogger("meterline.test")


async def eventually(condition: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not callable(condition) or not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def test_a_job_goes_on_after_a_failing_round(caplog: pytest.LogCaptureFixture) -> None:
    rounds: list[int] = []

    async def job() -> None:
        rounds.append(len(rounds))
        if len(rounds) == 2:
            raise ConnectionResetError("the database went away")

    caplog.set_level(logging.WARNING, logger="meterline.test")
    periodic = Periodic("test_job", 0.01, job, log)
    periodic.start()
    try:
        await eventually(lambda: len(rounds) >= 5)
    finally:
        await periodic.stop()
    failures = [r.getMessage() for r in caplog.records if r.name == "meterline.test"]
    assert failures == ["event=test_job_failed error=ConnectionResetError"]


async def test_a_stopped_job_runs_no_more_and_leaves_no_task() -> None:
    rounds: list[float] = []

    async def job() -> None:
        rounds.append(time.monotonic())

    before = asyncio.all_tasks()
    periodic = Periodic("test_job", 0.01, job, log)
    periodic.start()
    await eventually(lambda: len(rounds) >= 2)
    assert periodic.running
    await periodic.stop()
    done = len(rounds)
    await asyncio.sleep(0.05)
    assert len(rounds) == done
    assert not periodic.running
    assert asyncio.all_tasks() - before == {asyncio.current_task()} - before
    await periodic.stop()  # a second stop is harmless


async def test_a_woken_job_runs_before_its_interval() -> None:
    rounds: list[float] = []

    async def job() -> None:
        rounds.append(time.monotonic())

    async with Periodic("test_job", 3600, job, log) as periodic:
        await asyncio.sleep(0.05)
        assert rounds == []  # the first round waits for the interval
        periodic.wake()
        await eventually(lambda: len(rounds) == 1, timeout=1.0)


def _settings(database_url: str, tmp_path: Path, providers_file: str) -> Settings:
    providers = tmp_path / "providers.yaml"
    providers.write_text(providers_file)
    return Settings(
        database_url=database_url,
        data_dir=tmp_path / "data",
        providers=providers,
        admin_token=None,
    )


async def _connections(dsn: str, database: str) -> int:
    connection = await asyncpg.connect(dsn)
    try:
        count: int = await connection.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
            database,
        )
        return count
    finally:
        await connection.close()


async def test_a_start_that_fails_half_way_closes_what_it_started(
    fresh_database_url: str, tmp_path: Path
) -> None:
    """The providers file is read after the price cache, the listener, the key directory,
    the ledger writer and the upstream client started: all of them are closed again."""
    # No base_url, no models.
    settings = _settings(fresh_database_url, tmp_path, "providers:\n  - name: broken\n")
    dsn = asyncpg_dsn(fresh_database_url)
    database = str(make_url(fresh_database_url).database)  # an embedded server's URL has a query
    before = asyncio.all_tasks()
    with pytest.raises(Exception) as refused:
        await Runtime.start(settings)
    assert "broken" in str(refused.value)
    assert asyncio.all_tasks() - before == {asyncio.current_task()} - before
    # No pooled, listening or ledger connection is left open (a closed backend may take a
    # moment to leave pg_stat_activity).
    deadline = time.monotonic() + 5
    while (left := await _connections(dsn, database)) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert left == 0
    # The ledger writer was closed: its journal is gone (it held nothing).
    assert list((tmp_path / "data" / "spool" / "journal").iterdir()) == []


async def test_what_start_up_built_is_frozen_out_of_the_collector(
    fresh_database_url: str, tmp_path: Path
) -> None:
    """A full collection scans every object it tracks: over what start-up builds (a quarter
    of a million objects) one stalls the worker for 100 ms or more. A started app has moved
    them out of the collector's sight."""
    app = create_app(_settings(fresh_database_url, tmp_path, "providers: []\n"))
    gc.unfreeze()
    try:
        async with app.router.lifespan_context(app):
            runtime = app.state.runtime
            assert gc.get_freeze_count() > 0
            assert not any(tracked is runtime for tracked in gc.get_objects())
    finally:
        gc.unfreeze()


async def test_the_young_generation_is_collected_less_often_than_cpythons_default(
    fresh_database_url: str, tmp_path: Path
) -> None:
    """At CPython's 700, a worker relaying 500 streams spends 4-7 % of its CPU collecting
    objects that a stream keeps alive for its whole second; a started app raises the bound."""
    app = create_app(_settings(fresh_database_url, tmp_path, "providers: []\n"))
    default = gc.get_threshold()
    gc.set_threshold(700, *default[1:])
    try:
        async with app.router.lifespan_context(app):
            assert gc.get_threshold() == (YOUNG_COLLECTION_THRESHOLD, *default[1:])
    finally:
        gc.set_threshold(*default)
        gc.unfreeze()
