"""The metering proxy's logic: check, forward, pass the answer back, and record its usage.

Nothing here waits on Postgres: keys come from the in-memory `KeyCache`, prices from the
in-memory price book, and the ledger record is handed to the writer's queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import aiohttp
import orjson

from pricing.cost import TokenUsage, usage_cost
from pricing.prices import Price, PriceBook
from service.auth.key_cache import CachedKey, KeyCache
from service.errors import (
    BadRequest,
    MeterlineError,
    NotFound,
    PayloadTooLarge,
    Unauthorized,
    error_body,
)
from service.ledger.record import (
    LedgerRecord,
    has_control_characters,
    new_request_id,
    storable_text,
)
from service.ledger.writer import LedgerWriter
from service.prices.cache import PriceCache
from service.providers.config import Provider
from service.providers.router import ProviderRouter
from service.proxy import tokens
from service.proxy.access import AccessLog
from service.proxy.context import ProxyHooks, RequestContext
from service.proxy.redact import redact_provider_key
from service.proxy.sse import OutputCounter, StreamMeter
from service.proxy.upstream import UpstreamClient, UpstreamTimeout, UpstreamUnavailable
from service.proxy.usage import Usage, UsageClaim, flag_of

log = logging.getLogger("meterline.proxy")

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# The upstream path of each endpoint, relative to the provider's /v1 root.
ENDPOINT_PATHS = {
    "chat": "chat/completions",
    "completions": "completions",
    "embeddings": "embeddings",
}
MAX_TASK_FIELD = 128
MAX_MODEL = 256
# Prompts longer than this are counted off the event loop.
_THREAD_TOKENIZE_CHARS = 50_000
_STREAM_ERRORS = {
    "upstream_timeout": "the provider stopped sending before the stream was complete",
    "upstream_disconnected": "the provider closed the stream before it was complete",
    "max_tokens_exceeded": (
        "the provider generated past the completion tokens this request's budget "
        "reservation pays for (it ignored max_tokens); the stream was cut there"
    ),
}


class ModelNotFound(NotFound):
    code = "model_not_found"


class ProviderNotConfigured(MeterlineError):
    """The provider of a model has no key (its `api_key_env` is unset): the operator's to
    fix, so the provider's 401 never reaches a customer as if their key were bad."""

    status_code = 503
    type = "api_error"
    code = "provider_not_configured"


def _json_bytes(body: dict[str, Any]) -> bytes:
    return orjson.dumps(body)


class PriceMemo:
    """`PriceBook.price_for` remembered per model over one span of time in which no price
    version starts, so pricing a request is a dict lookup.

    The span is the one around the instant asked when the memo was last filled, and only a
    later instant (or a new book) moves it on. An earlier instant before the span — a stream
    that began before a new version came into force and ended after a newer request moved
    the memo past it — is looked up in the book: every row is priced by the version in
    force at its own `occurred_at`.
    """

    def __init__(self) -> None:
        self._book: PriceBook | None = None
        self._prices: dict[str, Price | None] = {}
        self._start: datetime | None = None
        self._end: datetime | None = None

    def price_for(self, book: PriceBook, model: str, at: datetime) -> Price | None:
        if book is not self._book or (self._end is not None and at >= self._end):
            self._book = book
            self._prices = {}
            self._start, self._end = book.unchanged_span(at)
        elif self._start is not None and at < self._start:
            return book.price_for(model, at)
        try:
            return self._prices[model]
        except KeyError:
            price = self._prices[model] = book.price_for(model, at)
            return price


class _ClientGone(Exception):
    pass


class _StreamState:
    __slots__ = ("disconnected", "done", "response")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.disconnected = False
        self.done = False
        self.response = response


def _headers(scope: Scope) -> dict[bytes, bytes]:
    # Header names arrive lower-cased (ASGI); a repeated header keeps its last value.
    return dict(scope["headers"])


async def _read_body(receive: Receive, limit: int, declared: bytes | None) -> bytes:
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body exceeds {limit} bytes")
    chunks = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone  # left before sending its whole request: nothing to answer
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _credential(headers: Mapping[bytes, bytes], key_headers: tuple[tuple[bytes, str], ...]) -> str:
    """The one key the request carries: `Authorization: Bearer` or any of `key_headers`."""
    found: dict[str, str] = {}
    authorization = headers.get(b"authorization")
    if authorization:
        scheme, _, value = authorization.decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise Unauthorized("Authorization header must be 'Bearer <key>'")
        found["Authorization"] = value.strip()
    for name, shown in key_headers:
        raw = headers.get(name)
        if raw and raw.strip():
            found[shown] = raw.decode("latin-1").strip()
    if len(set(found.values())) > 1:
        raise BadRequest(
            f"{' and '.join(found)} carry different keys; send one",
            code="conflicting_credentials",
        )
    if not found:
        raise Unauthorized(
            "You didn't provide an API key: send 'Authorization: Bearer <key>'",
            code="missing_api_key",
        )
    return next(iter(found.values()))


def _task_header(headers: Mapping[bytes, bytes], name: bytes) -> str | None:
    raw = headers.get(name)
    if raw is None:
        return None
    value = raw.decode("utf-8", "replace").strip()
    if len(value) > MAX_TASK_FIELD:
        raise BadRequest(
            f"{name.decode()} must be at most {MAX_TASK_FIELD} characters",
            code="invalid_header",
            param=name.decode(),
        )
    if has_control_characters(value):
        raise BadRequest(
            f"{name.decode()} must not contain control characters (such as NUL)",
            code="invalid_header",
            param=name.decode(),
        )
    return value or None


def _parse_body(raw: bytes, endpoint: str) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest(
            "We could not parse the JSON body of your request.", code="invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.", code="invalid_json")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("you must provide a model parameter", code="missing_model", param="model")
    if len(model) > MAX_MODEL:
        raise BadRequest("model name too long", code="invalid_model", param="model")
    if has_control_characters(model):
        raise BadRequest(
            "model must not contain control characters (such as NUL)",
            code="invalid_model",
            param="model",
        )
    if "stream" in body and not isinstance(body["stream"], bool | None):
        raise BadRequest("stream must be a boolean", code="invalid_type", param="stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise BadRequest(
            "stream_options must be an object", code="invalid_type", param="stream_options"
        )
    if endpoint == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest(
                "messages must be a non-empty array", code="invalid_type", param="messages"
            )
        if not all(isinstance(m, dict) for m in messages):
            raise BadRequest(
                "each message must be an object", code="invalid_type", param="messages"
            )
    elif endpoint == "completions":
        if not isinstance(body.get("prompt"), str | list):
            raise BadRequest(
                "prompt must be a string or an array", code="invalid_type", param="prompt"
            )
    elif endpoint == "embeddings" and not isinstance(body.get("input"), str | list):
        raise BadRequest("input must be a string or an array", code="invalid_type", param="input")
    return body


async def send_error(send: Send, error: MeterlineError, request_id: str | None) -> None:
    headers = [(b"content-type", b"application/json")]
    if request_id:
        headers.append((b"x-request-id", request_id.encode()))
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    body = orjson.dumps(error.body())
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": error.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _passed_headers(
    response: aiohttp.ClientResponse, ctx: RequestContext
) -> list[tuple[bytes, bytes]]:
    # Only the provider's rate-limit hints reach the client; nothing else of its headers.
    ours = ctx.response_headers
    out = []
    for name, value in response.raw_headers:
        lower = name.lower()
        if lower.startswith(b"retry-after") or (lower.startswith(b"x-ratelimit-") and not ours):
            out.append((lower, value))
    out += [(k.encode(), v.encode()) for k, v in ours.items()]
    return out


def _error_code(raw: bytes, status: int) -> str:
    """The provider's own error code when its body says one, else `upstream_<status>`."""
    with contextlib.suppress(orjson.JSONDecodeError):
        body = orjson.loads(raw)
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict):
            for field in ("code", "type"):
                if isinstance(error.get(field), str) and error[field]:
                    return storable_text(error[field], 64)
    return f"upstream_{status}"


def _capped_body(ctx: RequestContext) -> dict[str, Any]:
    """The body with `max_tokens` set to what the budget pays for, when a cap applies (the
    client set no completion limit); otherwise the client's body itself."""
    if ctx.max_tokens_cap is None:
        return ctx.body
    return {**ctx.body, "max_tokens": ctx.max_tokens_cap}


def _cut_past_allowance(counter: OutputCounter | None, piece: bytes) -> tuple[bytes, bool]:
    """The part of an upstream piece to pass on, and whether the stream is cut after it."""
    if counter is None:
        return piece, False
    keep = counter.feed(piece)
    return (piece, False) if keep is None else (piece[:keep], True)


class MeteringProxy:
    """One per worker; the ASGI endpoints call `forward` and `models`."""

    def __init__(
        self,
        *,
        keys: KeyCache,
        router: ProviderRouter,
        upstream: UpstreamClient,
        ledger: LedgerWriter,
        prices: PriceCache,
        hooks: ProxyHooks,
        max_body_bytes: int,
        key_headers: Sequence[str] = ("X-API-Key",),
        access_log: AccessLog | None = None,
    ) -> None:
        self.keys = keys
        self.router = router
        self.upstream = upstream
        self.ledger = ledger
        self.prices = prices
        self.hooks = hooks
        self.max_body_bytes = max_body_bytes
        # ASGI header names arrive lower-cased; messages name them as configured.
        self.key_headers = tuple((name.lower().encode("latin-1"), name) for name in key_headers)
        self.access_log = access_log
        self._prices = PriceMemo()
        self._headers_cache: dict[tuple[str, bool], dict[str, str]] = {}
        self._models_cache: tuple[float, list[dict[str, Any]]] | None = None

    # -- authentication -------------------------------------------------------------

    async def authenticate(self, headers: Mapping[bytes, bytes]) -> CachedKey:
        key = await self.keys.lookup(_credential(headers, self.key_headers))
        if key is None:
            raise Unauthorized("Incorrect API key provided, or the key was revoked or expired.")
        return key

    # -- the forwarded endpoints ----------------------------------------------------

    async def forward(self, endpoint: str, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        occurred_at = datetime.now(UTC)
        request_id = new_request_id()
        headers = _headers(scope)
        key: CachedKey | None = None
        try:
            key = await self.authenticate(headers)
            ctx = await self._admit(endpoint, headers, key, receive, request_id, occurred_at)
        except MeterlineError as error:
            await send_error(send, error, request_id)
            self._log_refusal(request_id, endpoint, error, started, key)
            return
        except _ClientGone:
            return
        try:
            await self._run_admission(ctx)
        except MeterlineError as error:
            await send_error(send, error, request_id)
            self._log_refusal(request_id, endpoint, error, started, key, ctx.model)
            return
        send = redact_provider_key(send, ctx.provider.api_key)
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

    async def _admit(
        self,
        endpoint: str,
        headers: Mapping[bytes, bytes],
        key: CachedKey,
        receive: Receive,
        request_id: str,
        occurred_at: datetime,
    ) -> RequestContext:
        task_id = _task_header(headers, b"x-task-id")
        task_type = _task_header(headers, b"x-task-type")
        raw = await _read_body(receive, self.max_body_bytes, headers.get(b"content-length"))
        body = _parse_body(raw, endpoint)
        model: str = body["model"]
        provider = self.router.route(model)
        if provider is None:
            raise ModelNotFound(
                f"The model `{model}` does not exist or you do not have access to it.",
                param="model",
            )
        if not provider.configured:
            raise ProviderNotConfigured(
                f"The model `{model}` cannot be served now: its provider is not configured "
                "on this server (the operator has been told at start-up).",
                headers={"x-should-retry": "false"},
            )
        stream = endpoint != "embeddings" and body.get("stream") is True
        return RequestContext(
            request_id=request_id,
            occurred_at=occurred_at,
            account_id=key.account_id,
            key_id=key.key_id,
            key_prefix=key.prefix,
            endpoint=endpoint,
            model=model,
            task_id=task_id,
            task_type=task_type,
            body=body,
            raw_body=raw,
            stream=stream,
            provider=provider,
        )

    async def _run_admission(self, ctx: RequestContext) -> None:
        if not self.hooks.admission:
            return
        try:
            for hook in self.hooks.admission:
                ctx.reservations.append(await hook(ctx))
        except BaseException:
            await self._settle(ctx, None)
            raise

    def _upstream_request(self, ctx: RequestContext) -> tuple[bytes, bool]:
        """The body to send and whether the client must not see injected usage.

        The client's bytes go as they are unless a documented edit applies."""
        body = _capped_body(ctx)
        provider = ctx.provider
        options = body.get("stream_options")
        if provider.stream_usage == "none" and "stream_options" in body:
            # Such providers never report usage and some reject the field outright.
            return _json_bytes({k: v for k, v in body.items() if k != "stream_options"}), False
        asked = isinstance(options, dict) and options.get("include_usage") is True
        if ctx.stream and provider.stream_usage == "inject" and not asked:
            edited = {**body, "stream_options": {**(options or {}), "include_usage": True}}
            return _json_bytes(edited), True
        return (ctx.raw_body if body is ctx.body else _json_bytes(body)), False

    def _upstream_headers(self, provider: Provider, stream: bool) -> dict[str, str]:
        cached = self._headers_cache.get((provider.name, stream))
        if cached is not None:
            return cached
        headers = {
            "Content-Type": "application/json",
            "Accept": "text/event-stream" if stream else "application/json",
            "Accept-Encoding": "identity",
        }
        headers.update(provider.auth_headers())
        self._headers_cache[(provider.name, stream)] = headers
        return headers

    async def _open(self, ctx: RequestContext, body: bytes) -> aiohttp.ClientResponse:
        url = ctx.provider.url(ENDPOINT_PATHS[ctx.endpoint])
        return await self.upstream.send(
            "POST", url, body, self._upstream_headers(ctx.provider, ctx.stream)
        )

    async def _forward_plain(self, ctx: RequestContext, send: Send, started: float) -> None:
        body, _ = self._upstream_request(ctx)
        failure: MeterlineError | None = None
        try:
            response = await self._open(ctx, body)
            try:
                raw = await response.read()
            finally:
                response.release()
        except (UpstreamUnavailable, UpstreamTimeout) as error:
            failure = error
        except (TimeoutError, aiohttp.ServerTimeoutError):
            failure = UpstreamTimeout("the provider did not answer in time")
        except aiohttp.ClientError:
            failure = UpstreamUnavailable("the provider closed the connection")
        if failure is not None:
            record = await self._record(
                ctx, failure.status_code, failure.code, Usage(), None, started
            )
            await send_error(send, failure, ctx.request_id)
            await self._settle(ctx, record)
            return

        status = response.status
        usage = Usage()
        upstream_model = None
        error_code = None
        if 200 <= status < 300:
            usage, upstream_model = await self._plain_usage(ctx, raw)
        else:
            error_code = _error_code(raw, status)
        record = await self._record(ctx, status, error_code, usage, upstream_model, started)
        headers = [
            (b"content-type", response.headers.get("Content-Type", "application/json").encode()),
            (b"content-length", str(len(raw)).encode()),
            (b"x-request-id", ctx.request_id.encode()),
        ]
        if record.cost_usd is not None:
            headers.append((b"x-meterline-cost-usd", format(record.cost_usd, "f").encode()))
        headers += _passed_headers(response, ctx)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": raw})
        await self._settle(ctx, record)

    async def _plain_usage(self, ctx: RequestContext, raw: bytes) -> tuple[Usage, str | None]:
        try:
            parsed = orjson.loads(raw)
        except orjson.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, dict):
            return await self._estimate(ctx, ""), None
        model = parsed.get("model") if isinstance(parsed.get("model"), str) else None
        usage = await self._claimed_usage(
            ctx, parsed.get("usage"), lambda: tokens.completion_text_of_body(parsed)
        )
        return usage, model

    async def _claimed_usage(
        self, ctx: RequestContext, raw: object, completion_text: Callable[[], str]
    ) -> Usage:
        """The provider's usage where it is usable, the rest estimated; flagged if implausible."""
        claim = UsageClaim.read(raw, ctx.endpoint) if isinstance(raw, dict) else None
        if claim is not None and claim.complete:
            usage = claim.usage()
        else:
            estimate = await self._estimate(ctx, completion_text())
            usage = claim.usage(estimate) if claim is not None else estimate
        usage.flag = flag_of(usage, claim, ctx.body)
        return usage

    async def _estimate(self, ctx: RequestContext, completion: str) -> Usage:
        prompt_text = tokens.prompt_text(ctx.body)
        if len(prompt_text) + len(completion) > _THREAD_TOKENIZE_CHARS:
            prompt, generated = await asyncio.to_thread(
                lambda: (tokens.count_tokens(prompt_text), tokens.count_tokens(completion))
            )
        else:
            prompt, generated = tokens.count_tokens(prompt_text), tokens.count_tokens(completion)
        return Usage(prompt, generated, prompt + generated, 0, 0, "estimated")

    async def _forward_stream(
        self, ctx: RequestContext, send: Send, receive: Receive, started: float
    ) -> None:
        body, hide_usage = self._upstream_request(ctx)
        try:
            response = await self._open(ctx, body)
        except (UpstreamUnavailable, UpstreamTimeout) as error:
            record = await self._record(ctx, error.status_code, error.code, Usage(), None, started)
            await send_error(send, error, ctx.request_id)
            await self._settle(ctx, record)
            return
        content_type = response.headers.get("Content-Type", "")
        if response.status >= 300 or not content_type.startswith("text/event-stream"):
            # An error (or a provider that ignored `stream`): pass it back as a whole body.
            try:
                raw = await response.read()
            except (TimeoutError, aiohttp.ClientError):
                raw = b""
            finally:
                response.release()
            status = response.status
            usage, model, code = Usage(), None, None
            if status < 300:
                usage, model = await self._plain_usage(ctx, raw)
            else:
                code = _error_code(raw, status)
            record = await self._record(ctx, status, code, usage, model, started)
            headers = [
                (b"content-type", (content_type or "application/json").encode()),
                (b"content-length", str(len(raw)).encode()),
                (b"x-request-id", ctx.request_id.encode()),
                *_passed_headers(response, ctx),
            ]
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": raw})
            await self._settle(ctx, record)
            return

        meter = StreamMeter(hide_usage)
        state = _StreamState(response)
        watcher = asyncio.create_task(self._watch_disconnect(receive, state))
        status, error_code, ttft_ms = response.status, None, None
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [
                        (b"content-type", content_type.encode()),
                        (b"cache-control", b"no-cache"),
                        (b"x-request-id", ctx.request_id.encode()),
                        *_passed_headers(response, ctx),
                    ],
                }
            )
            content = response.content
            allowance = ctx.completion_allowance
            counter = OutputCounter(allowance) if allowance is not None else None
            while piece := await content.readany():  # whatever arrived: no buffering
                piece, cut = _cut_past_allowance(counter, piece)
                out = meter.feed(piece)
                if out:
                    if ttft_ms is None:
                        ttft_ms = int((time.perf_counter() - started) * 1000)
                    await send({"type": "http.response.body", "body": out, "more_body": True})
                if state.disconnected:
                    break
                if cut:
                    status, error_code = 502, "max_tokens_exceeded"
                    break
            if not state.disconnected and error_code is None:
                state.done = True
                watcher.cancel()
                await send({"type": "http.response.body", "body": meter.flush()})
        except (TimeoutError, aiohttp.ServerTimeoutError):
            status, error_code = 504, "upstream_timeout"
        except (aiohttp.ClientError, ConnectionError):
            status, error_code = 502, "upstream_disconnected"
        except asyncio.CancelledError:
            # Server shutting down past its grace period: record what was generated.
            status, error_code = 499, "cancelled"
            await self._finish_stream(ctx, meter, status, error_code, ttft_ms, started, response)
            raise
        finally:
            state.done = True
            watcher.cancel()
        if state.disconnected:
            status, error_code = 499, "client_disconnected"
        elif error_code is not None:
            # The status line is gone already: end the stream with an error event in
            # OpenAI's shape, which the SDKs raise, so the client knows it was cut.
            message = _STREAM_ERRORS[error_code]
            event = orjson.dumps(error_body(message, "api_error", error_code))
            with contextlib.suppress(Exception):
                await send({"type": "http.response.body", "body": b"data: " + event + b"\n\n"})
        await self._finish_stream(ctx, meter, status, error_code, ttft_ms, started, response)

    async def _finish_stream(
        self,
        ctx: RequestContext,
        meter: StreamMeter,
        status: int,
        error_code: str | None,
        ttft_ms: int | None,
        started: float,
        response: aiohttp.ClientResponse,
    ) -> None:
        if status == 200 and error_code is None:
            response.release()
        else:
            response.close()  # cancels the generation upstream: the connection is dropped
        usage = await self._claimed_usage(
            ctx, meter.usage(), lambda: tokens.completion_text(meter.payloads())
        )
        record = await self._record(
            ctx, status, error_code, usage, meter.model(), started, ttft_ms=ttft_ms
        )
        await self._settle(ctx, record)

    @staticmethod
    async def _watch_disconnect(receive: Receive, state: _StreamState) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                if not state.done:
                    state.disconnected = True
                    state.response.close()
                return

    # -- recording -----------------------------------------------------------------------

    async def _record(
        self,
        ctx: RequestContext,
        status: int,
        error_code: str | None,
        usage: Usage,
        upstream_model: str | None,
        started: float,
        ttft_ms: int | None = None,
    ) -> LedgerRecord:
        price = self._prices.price_for(self.prices.book, ctx.model, ctx.occurred_at)
        cost: Decimal | None = None
        if price is not None:
            cost = usage_cost(TokenUsage(usage.prompt, usage.completion, usage.cached), price)
        record = LedgerRecord(
            request_id=ctx.request_id,
            occurred_at=ctx.occurred_at,
            account_id=ctx.account_id,
            key_id=ctx.key_id,
            task_id=ctx.task_id,
            task_type=ctx.task_type,
            endpoint=ctx.endpoint,
            requested_model=ctx.model,
            upstream_model=storable_text(upstream_model, MAX_MODEL) if upstream_model else None,
            provider=ctx.provider.name[:64],
            stream=ctx.stream,
            status_code=status,
            error_code=error_code if status >= 300 or error_code else None,
            prompt_tokens=usage.prompt,
            completion_tokens=usage.completion,
            total_tokens=usage.total,
            cached_tokens=usage.cached,
            reasoning_tokens=usage.reasoning,
            usage_source=usage.source,
            latency_ms=int((time.perf_counter() - started) * 1000),
            ttft_ms=ttft_ms,
            cost_usd=cost,
            price_version_id=price.version_id if price is not None else None,
            usage_flag=usage.flag,
        )
        self.ledger.submit(record)
        return record

    async def _settle(self, ctx: RequestContext, record: LedgerRecord | None) -> None:
        ctx.settled = True
        if record is not None and self.access_log is not None:
            self.access_log.request(record, ctx.key_prefix)
        for hook in self.hooks.settlement:
            try:
                await hook(ctx, record)
            except Exception:
                log.exception("event=settlement_failed request_id=%s", ctx.request_id)

    # -- GET /v1/models --------------------------------------------------------------------

    async def models(self, scope: Scope, send: Send) -> None:
        request_id = new_request_id()
        try:
            await self.authenticate(_headers(scope))
        except MeterlineError as error:
            await send_error(send, error, request_id)
            return
        body = orjson.dumps({"object": "list", "data": await self._model_list()})
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"x-request-id", request_id.encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def _model_list(self) -> list[dict[str, Any]]:
        """Models named in the providers file, plus those each provider lists and routes to
        itself (patterns cannot be enumerated otherwise). Cached for a minute."""
        now = time.monotonic()
        if self._models_cache is not None and now - self._models_cache[0] < 60:
            return self._models_cache[1]
        found: dict[str, str] = {m: p.name for m, p in self.router.exact_models()}
        listed = await asyncio.gather(
            *(self._provider_models(p) for p in self.router.providers), return_exceptions=True
        )
        for provider, models in zip(self.router.providers, listed, strict=True):
            if isinstance(models, BaseException):
                continue
            for model in models:
                if model not in found and self.router.route(model) is provider:
                    found[model] = provider.name
        data = [
            {"id": m, "object": "model", "created": 0, "owned_by": owner}
            for m, owner in sorted(found.items())
        ]
        self._models_cache = (now, data)
        return data

    async def _provider_models(self, provider: Provider) -> list[str]:
        headers = self._upstream_headers(provider, stream=False)
        response = await asyncio.wait_for(
            self.upstream.send("GET", provider.url("models"), None, headers), 5
        )
        try:
            data = orjson.loads(await response.read())
        finally:
            response.release()
        return [
            str(m["id"])
            for m in (data.get("data") or [] if isinstance(data, dict) else [])
            if isinstance(m, dict) and "id" in m
        ]
