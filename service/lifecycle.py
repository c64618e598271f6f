"""Background work of a running process: one way to run a job every so often and stop it.

Every long-lived part that refreshes, replays or rolls something up runs it as a `Periodic`:
the job runs every `interval` seconds (or at once when woken), a failing round is logged
with the part's logger and the next round comes as usual (the database may be down; the
next round catches up), and `stop` cancels it and waits for it to end. A round never
overlaps the next.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from types import TracebackType


class Periodic:
    """Run `job` every `interval` seconds from `start` until `stop`.

    `name` names the task and the log event of a failed round (`event=<name>_failed`).
    """

    def __init__(
        self,
        name: str,
        interval: float,
        job: Callable[[], Awaitable[object]],
        log: logging.Logger,
    ) -> None:
        self.name = name
        self.interval = interval
        self._job = job
        self._log = log
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=self.name)

    def wake(self) -> None:
        """Run the next round now rather than at the end of the interval."""
        self._wake.set()

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def __aenter__(self) -> Periodic:
        self.start()
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _run(self) -> None:
        while True:
            if not self._wake.is_set():
                # A timeout, not wait_for: no task of its own for each wait.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.interval):
                        await self._wake.wait()
            self._wake.clear()
            try:
                await self._job()
            except Exception as exc:
                self._log.warning("event=%s_failed error=%s", self.name, type(exc).__name__)
