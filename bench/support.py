"""Helpers shared by the benchmarks: a database of their own, free ports, child processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import psutil
from sqlalchemy.engine import make_url

from service.db.engine import asyncpg_dsn
from service.db.migrate import upgrade

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432/test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_http(url: str, process: subprocess.Popen[bytes], timeout: float = 180) -> None:
    # A loaded machine takes its time to start a server: three minutes before giving up.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise TimeoutError(url)


@contextlib.contextmanager
def run(
    args: list[str], ready: str, env: dict[str, str], log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """`args` started and answering at `ready` (the process, for its pid), stopped after."""
    with open(log, "wb") as out:
        process = subprocess.Popen(
            args, env={**os.environ, **env}, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
        )
        try:
            wait_http(ready, process)
            yield process
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    print("wrk not found: installing it with apt-get", flush=True)
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=True)
    found = shutil.which("wrk")
    if not found:
        raise SystemExit("could not install wrk")
    return found


@contextlib.contextmanager
def bench_database() -> Iterator[str]:
    """A new database migrated to head on the bench's Postgres server; dropped afterwards."""
    server = os.environ.get("METERLINE_DATABASE_URL", DEFAULT_SERVER)
    name = f"meterline_bench_{secrets.token_hex(4)}"

    async def admin(sql: str) -> None:
        connection = await asyncpg.connect(asyncpg_dsn(server))
        try:
            await connection.execute(sql)
        finally:
            await connection.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    url = make_url(server).set(database=name).render_as_string(hide_password=False)
    try:
        upgrade(url)
        yield url
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def scheduled_s(pid: int) -> tuple[float, float] | None:
    """Seconds process `pid`'s main thread has run on a core, and waited in the run queue
    for one (Linux's /proc/PID/schedstat; None elsewhere)."""
    try:
        ran, waited, _ = Path(f"/proc/{pid}/schedstat").read_text().split()
    except (OSError, ValueError):
        return None
    return int(ran) / 1e9, int(waited) / 1e9


def core_time(
    workers: list[psutil.Process], before: list[tuple[float, float] | None], seconds: float
) -> list[tuple[float, float]]:
    """Per worker, the ms per second of the last `seconds` its main thread ran on a core and
    waited for one, since `before` (each worker's `scheduled_s` then)."""
    per_s = []
    for worker, then in zip(workers, before, strict=True):
        now = scheduled_s(worker.pid)
        if then is not None and now is not None:
            ran, waited = ((b - a) * 1000 / seconds for a, b in zip(then, now, strict=True))
            per_s.append((ran, waited))
    return per_s


def describe_core_time(per_s: list[tuple[float, float]]) -> str:
    return (
        f"each worker's main thread per second on a core "
        f"{', '.join(f'{ran:.0f}' for ran, _ in per_s)} ms, waiting for one "
        f"{', '.join(f'{waited:.0f}' for _, waited in per_s)} ms"
    )


def workers_of(server: psutil.Process) -> list[psutil.Process]:
    """The processes that serve requests: uvicorn's spawned workers, or the server itself."""
    spawned = [p for p in server.children() if "multiprocessing-fork" in " ".join(p.cmdline())]
    return spawned or [server]


def connections_held(workers: list[psutil.Process], port: int) -> list[int]:
    """The client connections each worker holds on `port` now: how evenly they spread
    (keep-alive connections stay where they were accepted)."""
    return [
        sum(
            1
            for c in w.net_connections("tcp")
            if c.laddr.port == port and c.status == "ESTABLISHED"
        )
        for w in workers
    ]
