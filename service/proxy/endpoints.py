"""The OpenAI-compatible endpoints, as plain ASGI.

Plain ASGI (no FastAPI dependency injection, no Request object) keeps the hot path to
what the proxy itself does; the logic lives in `service.proxy.service`. `ProxyFastPath`
hands the four endpoints their requests before FastAPI's own middleware and router (a
measurable share of a pass-through's time); the routes below keep 405s and the like.
"""

from __future__ import annotations

from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from service.proxy.service import MeteringProxy


def _proxy(scope: Scope) -> MeteringProxy:
    proxy: MeteringProxy = scope["app"].state.runtime.proxy
    return proxy


class _Forward:
    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _proxy(scope).forward(self.endpoint, scope, receive, send)  # type: ignore[arg-type]


async def _models(scope: Scope, receive: Receive, send: Send) -> None:
    await _proxy(scope).models(scope, send)  # type: ignore[arg-type]


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


class ProxyFastPath:
    """ASGI middleware: the proxy's endpoints skip the rest of the stack."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            handler = _FAST.get((scope["method"], scope["path"]))
            if handler is not None:
                await handler(scope, receive, send)
                return
        await self.app(scope, receive, send)
