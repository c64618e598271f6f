"""The background sender: claims due deliveries, posts them signed, and schedules retries.

Every worker (and replica) runs one. A round claims up to `_BATCH` due deliveries in a
short transaction (`FOR UPDATE SKIP LOCKED`, so two senders never take the same one) and
pushes each one's next attempt past the attempt's deadline before sending anything: a
process killed mid-attempt leaves the delivery due again once that lease ends, so every
event is delivered at least once, with its id unchanged. The attempts then run
concurrently, outside any transaction, and their outcomes are written in a second one.

A 2xx is delivered. Anything else (another status, a redirect — never followed —, a
timeout, a refused connection, a destination that resolves to a private address) is retried
after `webhook_retry_base_s` * 2^(attempt - 1), capped at `webhook_retry_max_delay_s`,
until `webhook_retry_window_s` (24 h) after the event was raised; then it is `failed`.
Rounds run every `webhook_poll_interval_s` and at once on `NOTIFY meterline_webhooks`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.db.channels import Channel
from service.db.listener import Listener
from service.db.session import commit
from service.lifecycle import Periodic
from service.settings import Settings
from service.webhooks import destinations
from service.webhooks.events import event_ref
from service.webhooks.repository import ClaimedDelivery, WebhookRepository
from service.webhooks.signing import signed_headers

if TYPE_CHECKING:
    from service.webhooks.http import DeliveryClient

log = logging.getLogger("meterline.webhooks")

_BATCH = 32
# A claimed delivery is not claimed again before its attempt's deadline plus this margin.
_LEASE_MARGIN_S = 5.0


@dataclass(frozen=True, slots=True)
class Attempt:
    delivered: bool
    status_code: int | None
    error: str | None


def retry_delay(settings: Settings, attempts: int) -> float:
    """How long after its `attempts`-th failed attempt a delivery is tried again."""
    delay = settings.webhook_retry_base_s * 2.0 ** max(attempts - 1, 0)
    return min(delay, settings.webhook_retry_max_delay_s)


class WebhookSender:
    def __init__(
        self,
        settings: Settings,
        sessions: async_sessionmaker[AsyncSession],
        listener: Listener | None = None,
    ) -> None:
        self._settings = settings
        self._sessions = sessions
        self._http: DeliveryClient | None = None  # made for the first delivery
        self._job = Periodic(
            "webhook_sender", settings.webhook_poll_interval_s, self.deliver_due, log
        )
        if listener is not None:
            # A missed notification only delays a delivery to the next round.
            listener.subscribe(Channel.WEBHOOKS, lambda _payload: self._job.wake(), self._job.wake)

    async def start(self) -> None:
        self._job.start()

    async def stop(self) -> None:
        # In-flight attempts are cancelled; their deliveries come due again after the lease.
        await self._job.stop()
        if self._http is not None:
            await self._http.close()
            self._http = None

    def _client(self) -> DeliveryClient:
        if self._http is None:
            # Imported here: aiohttp costs every worker 9.5 MB, and most never send a webhook.
            from service.webhooks.http import DeliveryClient

            self._http = DeliveryClient(self._settings)
        return self._http

    def wake(self) -> None:
        self._job.wake()

    async def deliver_due(self) -> int:
        """Attempt every delivery due now; how many were attempted."""
        lease = self._settings.webhook_timeout_s + _LEASE_MARGIN_S
        attempted = 0
        while True:
            async with self._sessions() as session:
                claimed = await WebhookRepository(session).claim(_BATCH, lease)
                await commit(session)
            if not claimed:
                return attempted
            outcomes = await asyncio.gather(*(self._attempt(c) for c in claimed))
            async with self._sessions() as session:
                repository = WebhookRepository(session)
                for delivery, outcome in zip(claimed, outcomes, strict=True):
                    await self._record(repository, delivery, outcome)
                await commit(session)
            attempted += len(claimed)
            if len(claimed) < _BATCH:
                return attempted

    async def _record(
        self, repository: WebhookRepository, delivery: ClaimedDelivery, outcome: Attempt
    ) -> None:
        ref = event_ref(delivery.event_id)
        if outcome.delivered:
            assert outcome.status_code is not None
            await repository.delivered(delivery.id, outcome.status_code)
            log.info(
                "event=webhook_delivered delivery_id=%s event_id=%s attempts=%d status=%d",
                delivery.id,
                ref,
                delivery.attempts,
                outcome.status_code,
            )
            return
        delay = retry_delay(self._settings, delivery.attempts)
        await repository.failed(
            delivery.id,
            outcome.error or "failed",
            outcome.status_code,
            delay,
            self._settings.webhook_retry_window_s,
        )
        log.info(
            "event=webhook_attempt_failed delivery_id=%s event_id=%s attempts=%d error=%s"
            " retry_in_s=%.1f",
            delivery.id,
            ref,
            delivery.attempts,
            outcome.error,
            delay,
        )

    async def _attempt(self, delivery: ClaimedDelivery) -> Attempt:
        try:
            await destinations.check(delivery.url, self._settings.webhooks_allow_private)
        except destinations.UnsafeDestination as exc:
            return Attempt(False, None, str(exc))
        ref = event_ref(delivery.event_id)
        headers = signed_headers(delivery.secret, ref, int(time.time()), delivery.body)
        status, error = await self._client().post(delivery.url, delivery.body.encode(), headers)
        if status is None:
            return Attempt(False, None, error)
        if 200 <= status < 300:
            return Attempt(True, status, None)
        if 300 <= status < 400:
            return Attempt(False, status, f"HTTP {status}: redirects are not followed")
        return Attempt(False, status, f"HTTP {status}")
