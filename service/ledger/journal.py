"""The journal: every record appended to a file the moment it is made, before the response.

The in-memory queue is lost if the process is killed (SIGKILL, OOM) before the writer's
next flush; the journal is not: a write to the page cache outlives the process. Each
process appends to its own segment; once every record of a segment is in Postgres or in
the spool, the segment is deleted, and never before. At the next start, segments left by
dead processes are moved into the spool and replayed, and replaying rows already stored
changes nothing (`ON CONFLICT DO NOTHING`). No fsync: this guards against a killed
process, the spool's fsync guards against a crashed machine.

A segment that cannot be created (descriptors or disk exhausted) is not fatal: records go
on into the current segment, which is simply kept longer, and the failure is logged and
counted (`errors`, exported as `meterline_ledger_errors_total{step="journal"}`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

from service.ledger.spool import SUFFIX, _pid_alive

log = logging.getLogger("meterline.ledger")

JOURNAL_SUFFIX = ".journal"


class Journal:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._fd = -1
        self._path: Path | None = None
        # Failures are counted every time and logged once per streak (a flush retries often).
        self._failing = False
        self._failing_open = False
        self.errors = 0

    def open(self) -> bool:
        """Start a segment; False (logged, counted) when it cannot be created."""
        name = f"{time.time_ns():020d}-{os.getpid()}{JOURNAL_SUFFIX}"
        path = self.directory / name
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        except OSError as exc:
            self.errors += 1
            if not self._failing_open:
                self._failing_open = True
                log.error("event=journal_segment_failed file=%s error=%s", path, exc)
            return False
        if self._failing_open:
            self._failing_open = False
            log.info("event=journal_segment_recovered file=%s", path)
        self._path = path
        return True

    def append(self, line: bytes) -> None:
        """One write(2) of one record's JSON line; a full disk must not fail the request,
        only be logged."""
        try:
            os.write(self._fd, line + b"\n")
        except OSError as exc:
            self.errors += 1
            if not self._failing:
                self._failing = True
                log.error("event=journal_write_failed error=%s", exc)
        else:
            self._failing = False

    def rotate(self) -> Path | None:
        """Start a new segment; the old one is returned, to be discarded once durable.

        None when no new segment could be made: records keep going to the current one.
        """
        old, fd = self._path, self._fd
        if not self.open():
            return None
        if fd >= 0:
            os.close(fd)
        return old

    def discard(self, segment: Path) -> bool:
        """Delete a segment whose records are all durable; False if it could not be (yet)."""
        try:
            segment.unlink(missing_ok=True)
        except OSError as exc:
            self.errors += 1
            log.warning("event=journal_discard_failed file=%s error=%s", segment, exc)
            return False
        return True

    def close(self, discard: bool) -> None:
        """Stop appending. With `discard` (everything is durable elsewhere: a graceful
        shutdown) this process's segments are deleted; otherwise they stay for the next
        start to replay."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if discard:
            for path in self.directory.glob(f"*-{os.getpid()}{JOURNAL_SUFFIX}"):
                path.unlink(missing_ok=True)

    def recover_into(self, spool_dir: Path, at_start: bool) -> int:
        """Move segments of dead processes into the spool (to be replayed); how many."""
        moved = 0
        me = os.getpid()
        for path in self.directory.glob(f"*{JOURNAL_SUFFIX}"):
            pid = path.name[: -len(JOURNAL_SUFFIX)].rsplit("-", 1)[-1]
            if not pid.isdigit():
                continue
            stale = (at_start and int(pid) == me) or (int(pid) != me and not _pid_alive(int(pid)))
            if not stale:
                continue
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_size == 0:
                    path.unlink()
                    continue
                os.rename(path, spool_dir / f"{path.name[: -len(JOURNAL_SUFFIX)]}-j{SUFFIX}")
                moved += 1
        return moved
