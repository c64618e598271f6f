"""API docs that work offline: Swagger UI and ReDoc served from the package's own assets."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, RedirectResponse

from service.console.pages import STATIC

router = APIRouter(include_in_schema=False)
VENDOR = f"{STATIC}/vendor"
# Everything from this host: the pages' own inline start-up scripts and styles, ReDoc's
# search worker; nothing else (ReDoc's footer logo on a CDN is refused and hidden).
DOCS_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline';"
    " img-src 'self' data:; worker-src 'self' blob:; connect-src 'self'; frame-ancestors 'none'"
)


def _offline(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = DOCS_CSP
    return page


@router.get("/", response_class=RedirectResponse)
async def home() -> RedirectResponse:
    return RedirectResponse("/console", status_code=307)


@router.get("/docs", response_class=HTMLResponse)
async def swagger_ui() -> HTMLResponse:
    return _offline(
        get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="Meterline API",
            swagger_js_url=f"{VENDOR}/swagger-ui/swagger-ui-bundle.js",
            swagger_css_url=f"{VENDOR}/swagger-ui/swagger-ui.css",
            swagger_favicon_url=f"{VENDOR}/swagger-ui/favicon-32x32.png",
            # No badge from the public validator service: nothing leaves this host.
            swagger_ui_parameters={"validatorUrl": None},
        )
    )


@router.get("/redoc", response_class=HTMLResponse)
async def redoc() -> HTMLResponse:
    return _offline(
        get_redoc_html(
            openapi_url="/openapi.json",
            title="Meterline API",
            redoc_js_url=f"{VENDOR}/redoc/redoc.standalone.js",
            redoc_favicon_url=f"{VENDOR}/swagger-ui/favicon-32x32.png",
            with_google_fonts=False,
        )
    )
