"""The embedded default: a real Postgres run by `pgserver` inside the data directory.

Used only when `METERLINE_DATABASE_URL` is not set, so `meterline serve` works on a fresh
machine with nothing else installed. Only `serve` and `db upgrade` may create the cluster:
any other command finding none would otherwise start an empty one of its own and fail on
its first query.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from service.settings import Settings

log = logging.getLogger("meterline.db")


class NoEmbeddedDatabase(Exception):
    """No cluster in the data directory, and this command may not create one."""

    def __init__(self, pgdata: Path) -> None:
        super().__init__(
            f"no database: METERLINE_DATABASE_URL is not set and there is no embedded Postgres"
            f" in {pgdata}; run `meterline serve` or `meterline db upgrade` once to create it,"
            " or point METERLINE_DATA_DIR at the data directory `serve` uses"
        )


def _alive(pid: int) -> bool:
    import psutil  # pgserver's own dependency: its view of a process is the one that counts

    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def forget_dead_holders(pgdata: Path) -> list[int]:
    """Remove the processes that died holding the server from pgserver's list of holders.

    pgserver stops the server when its last holder leaves, but a holder killed outright
    (SIGKILL, out of memory) never leaves: its pid stays in `.handle_pids.json`, no later
    process is ever the last, and the server runs for good. Returns the pids removed.
    """
    from pgserver.postgres_server import PostgresServer
    from pgserver.utils import DiskList

    holders = DiskList(pgdata / ".handle_pids.json")
    # pgserver's own lock, the one it holds while it reads and writes that list.
    with PostgresServer._lock:
        pids = holders.get()
        dead = [pid for pid in pids if not _alive(pid)]
        if dead:
            holders.put([pid for pid in pids if pid not in dead])
    if dead:
        log.warning("event=embedded_postgres_dead_holders pgdata=%s pids=%s", pgdata, dead)
    return dead


class EmbeddedPostgres:
    def __init__(self, data_dir: Path) -> None:
        self.pgdata = (data_dir / "pg").resolve()
        self._server: Any = None

    @property
    def exists(self) -> bool:
        return (self.pgdata / "PG_VERSION").exists()

    def start(self, *, create: bool) -> str:
        """Start (or attach to) the server and return its connection URL; `create`: make
        the cluster when there is none (else NoEmbeddedDatabase)."""
        if not self.exists and not create:
            raise NoEmbeddedDatabase(self.pgdata)
        self.pgdata.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            # platformdirs complains when XDG_RUNTIME_DIR is unset (containers, CI); harmless.
            warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
            import pgserver  # imported here: only the embedded mode needs it

            forget_dead_holders(self.pgdata)
            # cleanup_mode="stop": the server stops when the last process using it exits,
            # and the data stays on disk for the next start.
            get_server = pgserver.get_server  # type: ignore[attr-defined]
            self._server = get_server(self.pgdata, cleanup_mode="stop")
        url: str = self._server.get_uri()
        log.info("event=embedded_postgres_started pgdata=%s", self.pgdata)
        return url

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()
            self._server = None


@contextmanager
def database_url(settings: Settings, *, create: bool = False) -> Iterator[str]:
    """The configured Postgres, or the embedded one started for as long as the block runs
    (`create`: made first if the data directory has none; else NoEmbeddedDatabase)."""
    if settings.database_url:
        yield settings.database_url
        return
    embedded = EmbeddedPostgres(settings.data_dir)
    url = embedded.start(create=create)
    try:
        yield url
    finally:
        embedded.stop()
