"""The metering proxy's flow: admit, forward, pass the answer back, record its usage, settle.

Each step has a home of its own: the request is read and checked in `inbound`, sent in
`upstream`, a stream relayed in `stream`, usage read in `usage`, answers written in
`asgi`, `GET /v1/models` listed in `models`; where a request goes, and where it goes
when an attempt fails, is `service.routing`'s. Nothing here waits on Postgres: keys come
from the in-memory `KeyCache`, prices from the in-memory price book, and the ledger
record is handed to the writer's queue.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Sequence
from datetime import UTC, datetime
from typing import TypeVar

import orjson
from starlette.types import Receive, Scope, Send

from pricing.cost import TokenUsage
from service.auth.key_cache import CachedKey, KeyCache
from service.errors import MeterlineError
from service.ledger.record import LedgerRecord, new_request_id, storable_text
from service.ledger.writer import LedgerWriter
from service.proxy.access import AccessLog
from service.proxy.asgi import send_error, send_whole
from service.proxy.context import ProxyHooks, RequestContext
from service.proxy.http_client import UpstreamResponse
from service.proxy.inbound import MAX_MODEL, ClientGone, authenticate, headers_of, read_request
from service.proxy.models import ModelList
from service.proxy.redact import redact_provider_key
from service.proxy.stream import StreamBounds, StreamRelay, is_event_stream
from service.proxy.upstream import (
    UPSTREAM_FAILURES,
    UpstreamClient,
    UpstreamTimeout,
    UpstreamUnavailable,
    passed_headers,
    request_body,
    route_headers,
    upstream_failure,
)
from service.proxy.usage import Usage, claimed_usage, error_code, usage_of_body
from service.routing.service import ModelRouter

UpstreamFailure = UpstreamUnavailable | UpstreamTimeout

log = logging.getLogger("meterline.proxy")


T = TypeVar("T")


async def within(seconds: float, attempt: Awaitable[T]) -> T:
    """`attempt` awaited, or a TimeoutError once `seconds` have passed: `asyncio.timeout`'s
    contract (a cancellation from elsewhere stays a cancellation) for a fraction of its
    cost, one timer cancelled on success, since every routed attempt but the last runs
    under it."""
    task = asyncio.current_task()
    assert task is not None
    cancelling = task.cancelling()
    fired = False

    def expire() -> None:
        nonlocal fired
        fired = True
        task.cancel()

    timer = asyncio.get_running_loop().call_later(seconds, expire)
    try:
        return await attempt
    except asyncio.CancelledError:
        if fired:
            fired = False
            if task.uncancel() <= cancelling:  # this timer's cancellation, no other
                raise TimeoutError from None
        raise
    finally:
        timer.cancel()
        if fired:  # expired as the attempt ended: its cancellation is withdrawn
            task.uncancel()


class MeteringProxy:
    """One per worker; the ASGI endpoints call `forward` and `models`."""

    def __init__(
        self,
        *,
        keys: KeyCache,
        routing: ModelRouter,
        upstream: UpstreamClient,
        ledger: LedgerWriter,
        hooks: ProxyHooks,
        max_body_bytes: int,
        body_timeout_s: float,
        stream_bounds: StreamBounds,
        key_headers: Sequence[str] = ("X-API-Key",),
        access_log: AccessLog | None = None,
        deadline_s: float = 60.0,
    ) -> None:
        self.keys = keys
        self.routing = routing
        self.stats = routing.stats
        self.deadline_s = deadline_s
        self.upstream = upstream
        self.ledger = ledger
        self.hooks = hooks
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.stream_bounds = stream_bounds
        # ASGI header names arrive lower-cased; messages name them as configured.
        self.key_headers = tuple((name.lower().encode("latin-1"), name) for name in key_headers)
        self.access_log = access_log
        self.model_list = ModelList(routing.providers, upstream)

    # -- the forwarded endpoints ----------------------------------------------------

    async def forward(self, endpoint: str, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        occurred_at = datetime.now(UTC)
        request_id = new_request_id()
        headers = headers_of(scope)
        key: CachedKey | None = None
        try:
            key = await authenticate(self.keys, headers, self.key_headers)
            ctx = await read_request(
                endpoint,
                headers,
                receive,
                key=key,
                routing=self.routing,
                max_body_bytes=self.max_body_bytes,
                body_timeout_s=self.body_timeout_s,
                request_id=request_id,
                occurred_at=occurred_at,
            )
        except MeterlineError as error:
            await send_error(send, error, request_id)
            self._log_refusal(request_id, endpoint, error, started, key)
            return
        except ClientGone:
            return
        try:
            await self._admit(ctx)
        except MeterlineError as error:
            await send_error(send, error, request_id)
            self._log_refusal(request_id, endpoint, error, started, key, ctx.model)
            return
        try:
            if ctx.stream:
                await self._forward_stream(ctx, send, receive, started)
            else:
                await self._forward_plain(ctx, send, started)
        finally:
            if not ctx.settled:  # an unexpected failure: reservations must not leak
                await self._settle(ctx, None)

    def _log_refusal(
        self,
        request_id: str,
        endpoint: str,
        error: MeterlineError,
        started: float,
        key: CachedKey | None,
        model: str | None = None,
    ) -> None:
        if self.access_log is None:
            return
        account_id, prefix = (key.account_id, key.prefix) if key is not None else (None, None)
        self.access_log.refused(
            request_id, endpoint, error.status_code, error.code, started, account_id, prefix, model
        )

    async def _admit(self, ctx: RequestContext) -> None:
        try:
            for name, hook in self.hooks.items():
                if hook.admit is not None:
                    ctx.reservations[name] = await hook.admit(ctx)
        except BaseException:
            await self._settle(ctx, None)
            raise

    async def _forward_plain(self, ctx: RequestContext, send: Send, started: float) -> None:
        response, _ = await self._open(ctx, started)
        send = redact_provider_key(send, ctx.provider.api_key)
        if isinstance(response, MeterlineError):
            await self._fail(ctx, send, response, started)
            return
        await self._answer_whole(ctx, send, response, started)

    async def _forward_stream(
        self, ctx: RequestContext, send: Send, receive: Receive, started: float
    ) -> None:
        response, hide_usage = await self._open(ctx, started)
        send = redact_provider_key(send, ctx.provider.api_key)
        if isinstance(response, MeterlineError):
            await self._fail(ctx, send, response, started)
            return
        if response.status >= 300 or not is_event_stream(response):
            # An error (or a provider that ignored `stream`): passed back as a whole body.
            await self._answer_whole(ctx, send, response, started)
            return
        relay = StreamRelay(ctx, response, hide_usage, started, self.stream_bounds)
        try:
            await relay.run(send, receive)
        except asyncio.CancelledError:
            # Server shutting down past its grace period: record what was generated.
            relay.status, relay.error_code = 499, "cancelled"
            await self._finish_stream(ctx, relay, started)
            raise
        await self._finish_stream(ctx, relay, started)

    # -- attempts ------------------------------------------------------------------------

    async def _open(
        self, ctx: RequestContext, started: float
    ) -> tuple[UpstreamResponse | UpstreamFailure, bool]:
        """The first answer worth passing on (its headers read), or the last failure; and
        whether the client must not see the usage asked for it.

        Nothing has reached the client yet, so an attempt that fails (connect error,
        timeout, 429, 5xx) moves on to the next candidate while one is left, within
        `routing_max_attempts` and the request's deadline; each failed attempt is a ledger
        row of its own (status, no charge)."""
        while True:
            body, hide_usage = request_body(ctx)
            ctx.attempt_started = time.perf_counter()
            left = self._time_to_fail_over(ctx, started)
            if left is None:  # the last attempt: as without routing
                try:
                    return await self.upstream.forward(ctx, body), hide_usage
                except (UpstreamUnavailable, UpstreamTimeout) as failure:
                    return failure, hide_usage
            try:
                # No connect retries here: the next provider is a better retry.
                response = await within(left, self.upstream.forward(ctx, body, retries=0))
            except (UpstreamUnavailable, UpstreamTimeout, TimeoutError) as exc:
                failed = upstream_failure(exc)
                self._failed_attempt(ctx, failed.status_code, failed.code)
                continue
            if response.status != 429 and response.status < 500:
                return response, hide_usage
            try:
                try:
                    raw = await response.read()
                finally:
                    response.release()
            except UPSTREAM_FAILURES:
                raw = b""
            self._failed_attempt(ctx, response.status, error_code(raw, response.status))

    def _time_to_fail_over(self, ctx: RequestContext, started: float) -> float | None:
        """Seconds this attempt may take before the next is tried; None: it is the last."""
        if not ctx.fallbacks or ctx.attempts >= self.routing.max_attempts:
            return None
        left = self.deadline_s - (time.perf_counter() - started)
        return left if left > 0 else None

    def _failed_attempt(self, ctx: RequestContext, status: int, code: str | None) -> None:
        """Record the attempt that failed (its own ledger row, no charge) and move `ctx` on
        to the next candidate."""
        self._record(
            ctx,
            status,
            code,
            Usage(),
            None,
            ctx.attempt_started,
            request_id=f"{ctx.request_id}.{ctx.attempts}",
        )
        log.info(
            "event=attempt_failed request_id=%s attempt=%d provider=%s model=%s status=%d",
            ctx.request_id,
            ctx.attempts,
            ctx.provider.name,
            ctx.model,
            status,
        )
        following = ctx.fallbacks[0]
        ctx.model, ctx.provider = following.model, following.provider
        ctx.fallbacks = ctx.fallbacks[1:]
        ctx.attempts += 1

    async def _answer_whole(
        self, ctx: RequestContext, send: Send, response: UpstreamResponse, started: float
    ) -> None:
        """The provider's answer as one body, with its status, request id and cost."""
        first_byte = (time.perf_counter() - ctx.attempt_started) * 1000
        try:
            try:
                raw = await response.read()
            finally:
                response.release()
        except UPSTREAM_FAILURES as exc:
            await self._fail(ctx, send, upstream_failure(exc), started)
            return
        status = response.status
        usage, model, code = Usage(), None, None
        if 200 <= status < 300:
            usage, model = await usage_of_body(ctx, raw)
        else:
            code = error_code(raw, status)
        record = self._record(ctx, status, code, usage, model, started, first_byte_ms=first_byte)
        headers = [(b"x-request-id", ctx.request_id.encode())]
        if record.cost_usd is not None:
            headers.append((b"x-meterline-cost-usd", format(record.cost_usd, "f").encode()))
        headers += passed_headers(response, ctx.response_headers)
        headers += route_headers(ctx)
        content_type = (response.header(b"content-type") or "application/json").encode()
        await send_whole(send, status, raw, headers, content_type)
        await self._settle(ctx, record)

    async def _fail(
        self, ctx: RequestContext, send: Send, failure: MeterlineError, started: float
    ) -> None:
        """The provider could not be reached or did not answer: a 502 or 504, recorded."""
        record = self._record(ctx, failure.status_code, failure.code, Usage(), None, started)
        if ctx.attempts > 1 or ctx.routed:
            failure.headers.update((k.decode(), v.decode()) for k, v in route_headers(ctx))
        await send_error(send, failure, ctx.request_id)
        await self._settle(ctx, record)

    async def _finish_stream(self, ctx: RequestContext, relay: StreamRelay, started: float) -> None:
        if relay.complete:
            relay.response.release()
        else:
            relay.response.close()  # cancels the generation upstream: the connection is dropped
        meter = relay.meter
        usage = await claimed_usage(ctx, meter.usage(), meter.completion_text)
        record = self._record(
            ctx, relay.status, relay.error_code, usage, meter.model(), started, relay.ttft_ms
        )
        await self._settle(ctx, record)

    # -- recording -----------------------------------------------------------------------

    def _record(
        self,
        ctx: RequestContext,
        status: int,
        error_code: str | None,
        usage: Usage,
        upstream_model: str | None,
        started: float,
        ttft_ms: int | None = None,
        *,
        first_byte_ms: float | None = None,
        request_id: str | None = None,
    ) -> LedgerRecord:
        """The ledger row of an attempt (the served one: `request_id` None), priced at the
        account's price of the model and provider it was sent to, and the attempt observed
        by the routing statistics."""
        tokens = TokenUsage(usage.prompt, usage.completion, usage.cached)
        provider = ctx.provider.name[:64]
        charge = self.routing.prices.tariff.charge(
            ctx.account_id, ctx.model, ctx.occurred_at, provider, tokens
        )
        now = time.perf_counter()
        record = LedgerRecord(
            request_id=request_id or ctx.request_id,
            occurred_at=ctx.occurred_at,
            account_id=ctx.account_id,
            key_id=ctx.key_id,
            task_id=ctx.task_id,
            task_type=ctx.task_type,
            endpoint=ctx.endpoint,
            requested_model=ctx.model,
            upstream_model=storable_text(upstream_model, MAX_MODEL) if upstream_model else None,
            provider=provider,
            stream=ctx.stream,
            status_code=status,
            error_code=error_code if status >= 300 or error_code else None,
            prompt_tokens=usage.prompt,
            completion_tokens=usage.completion,
            total_tokens=usage.total,
            cached_tokens=usage.cached,
            reasoning_tokens=usage.reasoning,
            usage_source=usage.source,
            latency_ms=int((now - started) * 1000),
            ttft_ms=ttft_ms,
            cost_usd=charge.cost_usd,
            price_version_id=charge.price_version_id,
            usage_flag=usage.flag,
            provider_cost_usd=charge.provider_cost_usd,
            provider_cost_version_id=charge.provider_cost_version_id,
            rate_card_version_id=charge.rate_card_version_id,
        )
        self.ledger.submit(record)
        if status != 499:  # a client that left says nothing of the provider
            self.stats.observe(
                ctx.provider.name,
                ctx.model,
                status == 429 or status >= 500,
                ttft_ms if ttft_ms is not None else first_byte_ms,
                (now - ctx.attempt_started) * 1000,
            )
        return record

    async def _settle(self, ctx: RequestContext, record: LedgerRecord | None) -> None:
        ctx.settled = True
        if record is not None and self.access_log is not None:
            self.access_log.request(record, ctx.key_prefix)
        for name, hook in self.hooks.items():
            if hook.settle is None:
                continue
            try:
                await hook.settle(ctx, record, ctx.reservations.get(name))
            except Exception:
                log.exception("event=settlement_failed request_id=%s", ctx.request_id)

    # -- GET /v1/models --------------------------------------------------------------------

    async def models(self, scope: Scope, send: Send) -> None:
        request_id = new_request_id()
        try:
            await authenticate(self.keys, headers_of(scope), self.key_headers)
        except MeterlineError as error:
            await send_error(send, error, request_id)
            return
        body = orjson.dumps({"object": "list", "data": await self.model_list.data()})
        await send_whole(send, 200, body, [(b"x-request-id", request_id.encode())])
