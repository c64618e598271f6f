"""The ASGI application: the OpenAI-compatible proxy and the billing API on one port."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from service.accounts.endpoints import router as accounts_router
from service.adjustments.endpoints import router as adjustments_router
from service.console import endpoints as console_pages  # noqa: F401  (registers the pages)
from service.console.pages import STATIC, ConsoleStatic
from service.console.pages import router as console_router
from service.credits.endpoints import router as credits_router
from service.db.engine import database_unavailable
from service.deps import provide
from service.docs.endpoints import router as docs_router
from service.errors import (
    DatabaseUnavailable,
    MalformedRequest,
    MeterlineError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    Unprocessable,
    error_body,
)
from service.events.endpoints import router as events_router
from service.health.endpoints import router as health_router
from service.invoices.endpoints import router as invoices_router
from service.limits.body import BodySizeLimit
from service.logs import RequestIds, configure_logging
from service.metrics.endpoints import router as metrics_router
from service.openai_usage.endpoints import router as openai_usage_router
from service.prices.endpoints import router as prices_router
from service.provider_costs.endpoints import router as provider_costs_router
from service.proxy.endpoints import PROXIED_ENDPOINTS, install_fast_path
from service.proxy.endpoints import routes as proxy_routes
from service.quotes.endpoints import router as quotes_router
from service.rate_cards.endpoints import router as rate_cards_router
from service.reports.endpoints import router as reports_router
from service.reports.margin.endpoints import router as margin_router
from service.reports.review.endpoints import router as review_router
from service.routing.endpoints import router as routing_router
from service.runtime import Runtime
from service.schemas import (
    CONTROL_CHARACTERS_MESSAGE,
    NO_CONTROL_CHARACTERS,
    NO_CONTROL_CHARACTERS_BUT_LINES,
)
from service.settings import Settings, get_settings
from service.tasks.endpoints import router as tasks_router
from service.usage.endpoints import router as usage_router
from service.webhooks.endpoints import router as webhooks_router

log = logging.getLogger("meterline.app")

# New tracked objects between two collections of the young generation (CPython: 700).
YOUNG_COLLECTION_THRESHOLD = 20_000


def _field_path(location: Sequence[object]) -> str:
    return ".".join(str(part) for part in location)


def _validation_message(error: dict[str, Any]) -> str:
    pattern = (error.get("ctx") or {}).get("pattern")
    if pattern in (NO_CONTROL_CHARACTERS, NO_CONTROL_CHARACTERS_BUT_LINES):
        return CONTROL_CHARACTERS_MESSAGE  # rather than the pattern itself
    return str(error.get("msg"))


# What Starlette's own refusals (routing, body reading, the body limit) are called.
_HTTP_ERRORS = {
    kind.status_code: kind
    for kind in (MalformedRequest, NotFound, MethodNotAllowed, PayloadTooLarge)
}


def _render(error: MeterlineError) -> Response:
    return JSONResponse(error.body(), status_code=error.status_code, headers=error.headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(MeterlineError)
    async def _meterline_error(request: Request, exc: MeterlineError) -> Response:
        return _render(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        param = _field_path(first.get("loc", ()))
        reason = _validation_message(first)
        message = f"{param}: {reason}" if param else reason
        return _render(Unprocessable(message, param=param or None))

    async def _database_error(request: Request, exc: Exception) -> Response:
        if not database_unavailable(exc):
            return _internal_error(request, exc)
        log.warning(
            "event=database_unavailable path=%s error=%s", request.url.path, type(exc).__name__
        )
        return _render(DatabaseUnavailable())

    # Whatever the database driver raises, mapped in one place (the proxy never gets here:
    # it does not wait on Postgres).
    for database_error in (OSError, SQLAlchemyError, asyncpg.PostgresError, asyncpg.InterfaceError):
        app.add_exception_handler(database_error, _database_error)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = _HTTP_ERRORS.get(exc.status_code, MalformedRequest).code
        message = str(exc.detail)
        if exc.status_code == 404 and request.url.path.startswith("/v1/"):
            # OpenAI's wording, so an SDK user calling an endpoint Meterline does not proxy
            # (`/v1/responses`, `/v1/files`…) reads what happened and what is served.
            message = (
                f"Invalid URL ({request.method} {request.url.path}): Meterline proxies "
                f"{', '.join(PROXIED_ENDPOINTS)}"
            )
        return JSONResponse(
            error_body(message, "invalid_request_error", code),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        return _internal_error(request, exc)


def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("event=unhandled_error path=%s", request.url.path, exc_info=exc)
    return JSONResponse(
        error_body("internal error", "server_error", "internal_error"), status_code=500
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging(settings.log_level)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = await Runtime.start(settings)
        provide(app, runtime)
        # What start-up built lives as long as the worker: frozen out of the collector's
        # sight, a full collection scans only what came since. Over the ~250,000 start-up
        # objects one took 90-120 ms, a stall every stream in flight felt.
        gc.collect()
        gc.freeze()
        # The young generation is collected every 20,000 new objects, not 700: held at 400
        # streams for 6 s, a worker spent 0.15-0.30 s in ~60 collections at 700 (a stream's
        # objects outlive many, so each scans and promotes them again), and 0.03-0.05 s in one
        # at 20,000; the longest pause was no longer (21-46 ms against 28-46).
        gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, *gc.get_threshold()[1:])
        try:
            yield
        finally:
            await runtime.close()

    app = FastAPI(
        title="Meterline",
        version="0.1.0",
        description="Usage metering and outcome-based billing for OpenAI-compatible LLM APIs.",
        lifespan=lifespan,
        # Served by service.docs from vendored assets, so they work without internet.
        docs_url=None,
        redoc_url=None,
        # Meterline exports its own metrics (Prometheus). FastAPI's OpenTelemetry would ask
        # the global providers on every request whether it is wanted, 4.4 µs that the proxy's
        # fast path paid too, FastAPI's own `__call__` being outside it.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    install_error_handlers(app)
    # Request ids outside everything else, Starlette's own 500s included; only the proxy's
    # fast path is put in front of them (its responses carry the ledger's request id).
    build = app.build_middleware_stack
    app.build_middleware_stack = lambda: RequestIds(build())  # type: ignore[method-assign]
    # The proxy's endpoints skip FastAPI's middleware (CORS, when configured, still wraps them).
    install_fast_path(app, behind_cors=bool(settings.cors_origins))
    # The billing API's bodies are bounded like the proxy's (inside CORS: a 413 keeps them).
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_body_bytes)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
        )
    # The OpenAI-compatible proxy: plain ASGI routes, first in line (the hot path).
    app.router.routes[:0] = proxy_routes
    app.include_router(health_router)
    app.include_router(metrics_router)
    app.include_router(accounts_router)
    app.include_router(credits_router)
    app.include_router(adjustments_router)
    app.include_router(usage_router)
    app.include_router(events_router)
    app.include_router(reports_router)
    app.include_router(review_router)
    app.include_router(quotes_router)
    app.include_router(tasks_router)
    app.include_router(margin_router)
    app.include_router(prices_router)
    app.include_router(provider_costs_router)
    app.include_router(rate_cards_router)
    app.include_router(routing_router)
    app.include_router(invoices_router)
    app.include_router(openai_usage_router)
    app.include_router(webhooks_router)
    app.include_router(docs_router)
    app.include_router(console_router)
    app.mount(
        STATIC, ConsoleStatic(packages=[("service.console", "static")]), name="console-static"
    )
    return app
