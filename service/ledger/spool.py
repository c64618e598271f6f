"""The durable spool: batches that could not reach Postgres, one file per batch.

A file is written beside its final name, fsynced, renamed into place and the folder
fsynced, so a file under its final name is always complete. Several workers share the
folder: a file is claimed for replay by renaming it to `<name>.claim-<pid>`, which only
one process can do; claims of a process that died are given back at the next start.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

from service.ledger.record import LedgerRecord

log = logging.getLogger("meterline.ledger")

SUFFIX = ".jsonl"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.rejected = directory / "rejected"
        self._seq = itertools.count()
        directory.mkdir(parents=True, exist_ok=True)

    def write(self, lines: Sequence[bytes]) -> Path:
        """Store a batch (the records' JSON lines) durably; blocking: call it from a thread."""
        pid = os.getpid()
        name = f"{time.time_ns():020d}-{pid}-{next(self._seq):06d}{SUFFIX}"
        final = self.directory / name
        partial = self.directory / f"{name}.{pid}.tmp"
        with open(partial, "wb") as out:
            out.write(b"\n".join(lines) + b"\n")
            out.flush()
            os.fsync(out.fileno())
        os.rename(partial, final)
        _fsync_dir(self.directory)
        return final

    def pending(self) -> list[Path]:
        """Unclaimed batch files, oldest first."""
        return sorted(self.directory.glob(f"*{SUFFIX}"))

    def claim(self, path: Path) -> Path | None:
        claimed = path.with_name(f"{path.name}.claim-{os.getpid()}")
        try:
            os.rename(path, claimed)
        except FileNotFoundError:
            return None  # another worker took it
        return claimed

    def release(self, claimed: Path) -> None:
        """Give a claimed file back (its replay failed; it will be tried again)."""
        os.rename(claimed, claimed.with_name(claimed.name.rsplit(".claim-", 1)[0]))

    def done(self, claimed: Path) -> None:
        claimed.unlink(missing_ok=True)

    def reject(self, claimed: Path) -> Path:
        """Set aside a batch that cannot be stored even row by row, so it cannot block the
        rest (never expected: a refused row is quarantined)."""
        self.rejected.mkdir(exist_ok=True)
        target = self.rejected / claimed.name.rsplit(".claim-", 1)[0]
        os.rename(claimed, target)
        return target

    def requeue_rejected(self) -> int:
        """Put batches set aside by earlier versions (whole batches refused for one bad row)
        back in line: replayed now, only their bad rows are quarantined."""
        if not self.rejected.is_dir():
            return 0
        moved = 0
        for path in sorted(self.rejected.glob(f"*{SUFFIX}")):
            with contextlib.suppress(FileNotFoundError):  # another worker took it
                os.rename(path, self.directory / path.name)
                moved += 1
        if moved:
            log.info("event=spool_rejected_requeued files=%d", moved)
        return moved

    @staticmethod
    def read(path: Path) -> list[bytes]:
        """The batch's JSON lines, each checked to be a whole record."""
        lines = []
        for line in path.read_bytes().splitlines():
            if not line.strip():
                continue
            try:
                LedgerRecord.from_json(line)
            except (ValueError, TypeError, KeyError):
                # Only a torn last line of an interrupted write can be unreadable.
                log.warning("event=spool_line_unreadable file=%s", path.name)
                continue
            lines.append(line)
        return lines

    def recover_orphans(self, at_start: bool = False) -> int:
        """Give back claims of dead processes and finish their interrupted writes.

        At start-up a claim carrying this process's own pid is stale too: the pid was
        reused after a crash (common in containers).
        """
        recovered = 0
        me = os.getpid()
        for path in self.directory.iterdir():
            name = path.name
            if ".claim-" in name:
                pid = name.rsplit(".claim-", 1)[1]
                if pid.isdigit() and (
                    (at_start and int(pid) == me) or (int(pid) != me and not _pid_alive(int(pid)))
                ):
                    self.release(path)
                    recovered += 1
            elif name.endswith(".tmp"):
                pid = name[: -len(".tmp")].rsplit(".", 1)[-1]
                if pid.isdigit() and (
                    (at_start and int(pid) == me) or (int(pid) != me and not _pid_alive(int(pid)))
                ):
                    # Died between write and rename: keep whatever complete lines it has.
                    final = path.with_name(name[: -len(".tmp")].rsplit(".", 1)[0])
                    with contextlib.suppress(FileNotFoundError):
                        os.rename(path, final)
                        recovered += 1
        return recovered

    def stats(self) -> tuple[int, int]:
        """(files, bytes) waiting in the spool."""
        files = self.pending()
        size = 0
        for path in files:
            with contextlib.suppress(FileNotFoundError):
                size += path.stat().st_size
        return len(files), size
