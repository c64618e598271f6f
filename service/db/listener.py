"""The one LISTEN connection of a worker, dispatching every channel to the parts that follow it.

Each part subscribes to its channel with what to do with a notification and what to do
when the connection (re)opens: whatever was sent while it was down was missed, so the part
reloads. A lost connection is reopened within a second, with every subscription.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import asyncpg

from service.db.channels import Channel
from service.lifecycle import Periodic

log = logging.getLogger("meterline.db")

_RECONNECT_S = 1.0
_CONNECT_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class Subscription:
    channel: Channel
    on_message: Callable[[str], None]  # the payload, on the event loop, never blocking
    on_connected: Callable[[], None]  # notifications may have been missed: catch up


class Listener:
    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._subscriptions: list[Subscription] = []
        self._connection: asyncpg.Connection | None = None
        self._keeper = Periodic("listen", _RECONNECT_S, self._ensure_connected, log)

    def subscribe(
        self,
        channel: Channel,
        on_message: Callable[[str], None],
        on_connected: Callable[[], None],
    ) -> None:
        """Follow `channel` (before `start`: the connection listens to what it was given)."""
        self._subscriptions.append(Subscription(channel, on_message, on_connected))

    @property
    def connected(self) -> bool:
        return self._connection is not None and not self._connection.is_closed()

    async def start(self) -> None:
        try:
            await self._ensure_connected()
        except Exception as exc:  # Postgres down at start: the keeper retries every second
            log.warning("event=listen_failed error=%s", type(exc).__name__)
        self._keeper.start()

    async def close(self) -> None:
        await self._keeper.stop()
        await self._drop()

    async def _ensure_connected(self) -> None:
        if self.connected:
            return
        await self._drop()
        connection = await asyncpg.connect(self._dsn, timeout=_CONNECT_TIMEOUT_S)
        try:
            for channel in {s.channel for s in self._subscriptions}:
                await connection.add_listener(channel.value, self._dispatch)
        except BaseException:
            with contextlib.suppress(Exception):
                await connection.close(timeout=2)
            raise
        self._connection = connection
        for subscription in self._subscriptions:
            subscription.on_connected()

    def _dispatch(self, _connection: Any, _pid: int, channel: str, payload: str) -> None:
        for subscription in self._subscriptions:
            if subscription.channel.value == channel:
                subscription.on_message(payload)

    async def _drop(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None and not connection.is_closed():
            with contextlib.suppress(Exception):
                await connection.close(timeout=2)
