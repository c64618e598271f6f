"""Talking to the providers: one connection pool per worker (`service.proxy.http_client`).

Connection failures are retried, since nothing was sent yet; a request that reached the
provider is never sent twice. What talking to a provider raises becomes a 502 or a 504 in
`upstream_failure`, the one place that decides which.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Mapping
from typing import Any

import orjson

from service.errors import MeterlineError
from service.providers.config import Provider
from service.proxy.context import RequestContext
from service.proxy.http_client import (
    ConnectFailed,
    ConnectionPool,
    ConnectTimeout,
    UpstreamResponse,
)

log = logging.getLogger("meterline.proxy")


class UpstreamUnavailable(MeterlineError):
    status_code = 502
    type = "api_error"
    code = "upstream_unavailable"


class UpstreamTimeout(MeterlineError):
    status_code = 504
    type = "api_error"
    code = "upstream_timeout"


# What talking to a provider may raise once connected: sending, or reading its answer.
UPSTREAM_FAILURES = (TimeoutError, ConnectionError)

# The upstream path of each endpoint, relative to the provider's /v1 root.
ENDPOINT_PATHS = {
    "chat": "chat/completions",
    "completions": "completions",
    "embeddings": "embeddings",
}


def upstream_failure(exc: BaseException) -> UpstreamTimeout | UpstreamUnavailable:
    """The 504 (too slow) or 502 (gone) that one of `UPSTREAM_FAILURES` is."""
    if isinstance(exc, UpstreamTimeout | UpstreamUnavailable):
        return exc
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout("the provider did not answer in time")
    return UpstreamUnavailable("the provider closed the connection")


class UpstreamClient:
    def __init__(self, connect_timeout_s: float, read_timeout_s: float, retries: int) -> None:
        self.retries = retries
        self._timeouts = (connect_timeout_s, read_timeout_s)
        self._pool: ConnectionPool | None = None
        self._headers: dict[tuple[str, bool], dict[str, str]] = {}

    async def start(self) -> None:
        self._pool = ConnectionPool(*self._timeouts, keepalive_s=30)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()

    async def send(
        self,
        method: str,
        url: str,
        body: bytes | None,
        headers: Mapping[str, str],
        retries: int | None = None,
    ) -> UpstreamResponse:
        """The provider's response, headers read, body not yet; raises 502 / 504 errors.
        A failed connection is retried `retries` times (default: the client's)."""
        assert self._pool is not None, "UpstreamClient.start() was not awaited"
        retries = self.retries if retries is None else retries
        attempt = 0
        while True:
            try:
                return await self._pool.request(method, url, body, headers)
            except (ConnectFailed, ConnectTimeout) as exc:
                # Failed while connecting: the provider has seen nothing, a retry is safe.
                if attempt >= retries:
                    if isinstance(exc, ConnectTimeout):
                        raise UpstreamTimeout("timed out connecting to the provider") from exc
                    raise UpstreamUnavailable("could not connect to the provider") from exc
                attempt += 1
                log.info(
                    "event=upstream_connect_retry attempt=%d error=%s", attempt, type(exc).__name__
                )
                await asyncio.sleep(0.05 * attempt)
            except UPSTREAM_FAILURES as exc:
                raise upstream_failure(exc) from exc

    def forward(
        self, ctx: RequestContext, body: bytes, retries: int | None = None
    ) -> Awaitable[UpstreamResponse]:
        """`body` sent to the provider of `ctx` at the endpoint's path (see `send`); not a
        coroutine of its own, so a request costs no extra frame."""
        url = ctx.provider.url(ENDPOINT_PATHS[ctx.endpoint])
        return self.send("POST", url, body, self.headers_for(ctx.provider, ctx.stream), retries)

    def headers_for(self, provider: Provider, stream: bool) -> dict[str, str]:
        """The headers of a request to `provider`: its key, never the client's."""
        cached = self._headers.get((provider.name, stream))
        if cached is not None:
            return cached
        headers = {
            "Content-Type": "application/json",
            "Accept": "text/event-stream" if stream else "application/json",
            "Accept-Encoding": "identity",
        }
        headers.update(provider.auth_headers())
        self._headers[(provider.name, stream)] = headers
        return headers


def request_body(ctx: RequestContext) -> tuple[bytes, bool]:
    """The body to send and whether the client must not see the usage asked for it.

    The client's bytes go as they are unless a documented edit applies: `max_tokens` set
    to what the budget pays for (the client set no completion limit), `model` named (the
    client sent a model object), and `stream_options` as the provider's `stream_usage`
    needs it."""
    body = (
        ctx.body if ctx.max_tokens_cap is None else {**ctx.body, "max_tokens": ctx.max_tokens_cap}
    )
    if ctx.routed:
        body = {**body, "model": ctx.model}
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


def _json_bytes(body: dict[str, Any]) -> bytes:
    return orjson.dumps(body)


def passed_headers(
    response: UpstreamResponse, ours: Mapping[str, str]
) -> list[tuple[bytes, bytes]]:
    """The provider's headers the client gets (only its rate-limit hints), then `ours`."""
    out = []
    for name, value in response.raw_headers:
        lower = name.lower()
        if lower.startswith(b"retry-after") or (lower.startswith(b"x-ratelimit-") and not ours):
            out.append((lower, value))
    out += [(k.encode(), v.encode()) for k, v in ours.items()]
    return out


def route_headers(ctx: RequestContext) -> list[tuple[bytes, bytes]]:
    """Which model and provider served the request, after how many attempts."""
    return [
        (b"x-meterline-model", ctx.model.encode()),
        (b"x-meterline-provider", ctx.provider.name.encode()),
        (b"x-meterline-attempts", str(ctx.attempts).encode()),
    ]
