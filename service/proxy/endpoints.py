"""The OpenAI-compatible endpoints, as plain ASGI.

Plain ASGI (no FastAPI dependency injection, no Request object) keeps the hot path to
what the proxy itself does; the logic lives in `service.proxy.service`. `ProxyFastPath`
hands the four endpoints their requests before FastAPI's own middleware and router (a
measurable share of a pass-through's time); the routes below keep 405s and the like.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable

import orjson
from starlette.applications import Starlette
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import error_body
from service.proxy.asgi import send_whole
from service.proxy.service import MeteringProxy

log = logging.getLogger("meterline.proxy")


def _proxy(scope: Scope) -> MeteringProxy:
    proxy: MeteringProxy = scope["app"].state.runtime.proxy
    return proxy


class _Forward:
    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _proxy(scope).forward(self.endpoint, scope, receive, send)


async def _models(scope: Scope, receive: Receive, send: Send) -> None:
    await _proxy(scope).models(scope, send)


class _Models:
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _models(scope, receive, send)


routes: list[BaseRoute] = [
    Route("/v1/chat/completions", _Forward("chat"), methods=["POST"]),
    Route("/v1/completions", _Forward("completions"), methods=["POST"]),
    Route("/v1/embeddings", _Forward("embeddings"), methods=["POST"]),
    Route("/v1/models", _Models(), methods=["GET"]),
]

_FAST: dict[tuple[str, str], ASGIApp] = {
    ("POST", "/v1/chat/completions"): _Forward("chat"),
    ("POST", "/v1/completions"): _Forward("completions"),
    ("POST", "/v1/embeddings"): _Forward("embeddings"),
    ("GET", "/v1/models"): _Models(),
}
# What the 404 of any other `/v1/…` path names as served.
PROXIED_ENDPOINTS = tuple(f"{method} {path}" for method, path in _FAST)


class ProxyFastPath:
    """ASGI middleware: the proxy's endpoints skip the rest of the stack.

    Outermost (see `install_fast_path`), it also stands in for the server-error
    middleware it skips: an unexpected failure is logged and answered with a 500 in
    OpenAI's shape, never a bare traceback.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            handler = _FAST.get((scope["method"], scope["path"]))
            if handler is not None:
                await self._guarded(handler, scope, receive, send)
                return
        await self.app(scope, receive, send)

    @staticmethod
    async def _guarded(handler: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        # Not a coroutine: it hands back `send`'s own awaitable, so no frame is added per
        # message (a stream sends one per chunk).
        def tracking_send(message: Message) -> Awaitable[None]:
            nonlocal started
            started = True
            return send(message)

        try:
            await handler(scope, receive, tracking_send)
        except Exception:
            log.exception("event=unhandled_error path=%s", scope["path"])
            if not started:
                body = orjson.dumps(error_body("internal error", "server_error", "internal_error"))
                await send_whole(send, 500, body)


def install_fast_path(app: Starlette, behind_cors: bool) -> None:
    """Put `ProxyFastPath` in front of the whole middleware stack (FastAPI's telemetry,
    body limit and error handling cost a measurable share of a pass-through's time).
    With CORS configured it goes inside the CORS middleware instead, which must see
    every response."""
    if behind_cors:
        app.add_middleware(ProxyFastPath)
        return
    build = app.build_middleware_stack

    def build_with_fast_path() -> ASGIApp:
        return ProxyFastPath(build())

    app.build_middleware_stack = build_with_fast_path  # type: ignore[method-assign]
