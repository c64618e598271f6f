"""How a console page is made: its route, its place in the navigation, sign-in, CSRF, HTML.

A page is one function decorated with `@page(...)` (a GET route and a navigation entry) and
one template; a form's POST route takes `Posted`, which refuses a request without the
session's CSRF token. Errors the services raise (`MeterlineError`) come back as an HTML page
with the same status and message the API would give.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from functools import cache
from importlib.resources import files
from typing import Annotated, Any
from urllib.parse import parse_qs, quote

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup
from pydantic import BeforeValidator, ValidationError
from starlette.types import Scope

from pricing.money import format_usd
from pricing.price_table import format_rate
from service.console import sessions
from service.console.sessions import COOKIE, SignedIn
from service.deps import Config, Session
from service.errors import Forbidden, MeterlineError, NotFound, Unprocessable
from service.invoices.pdf import unit_price
from service.schemas import Period, fixed_point

STATIC = "/console/static"
# A versioned asset (`?v=` its content's hash, `asset()` below) never changes at its URL,
# so a browser keeps it for a year and a page's next view asks for none of them again.
IMMUTABLE = "public, max-age=31536000, immutable"
# The console's style sheet goes inside each page, so a first view paints without waiting
# for another file; the policy admits exactly that sheet, by its hash.
CONSOLE_CSS = (files("service.console") / "static" / "console.css").read_text()
_CSS_HASH = base64.b64encode(hashlib.sha256(CONSOLE_CSS.encode()).digest()).decode()
# Pages hold account data: never cached, never framed, scripts and styles from here only.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self';"
        f" style-src 'self' 'sha256-{_CSS_HASH}'; img-src 'self' data:;"
        " object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


class CsrfFailed(Forbidden):
    code = "csrf_failed"
    description = "The form has expired or did not come from the console."


class SignInRequired(Exception):
    def __init__(self, next_path: str) -> None:
        self.next_path = next_path


def _with_headers(response: Response) -> Response:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


class ConsoleRoute(APIRoute):
    """Renders the services' errors as pages, and sends a signed-out browser to sign in."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                response = await handler(request)
            except SignInRequired as exc:
                response = RedirectResponse(
                    f"/console/sign-in?next={quote(exc.next_path, safe='/')}", status_code=303
                )
            except MeterlineError as exc:
                response = error_page(request, exc.status_code, exc.message)
            except (RequestValidationError, ValidationError) as exc:
                response = error_page(request, 422, _validation_message(exc))
            return _with_headers(response)

        return route


def _validation_message(exc: RequestValidationError | ValidationError) -> str:
    errors = exc.errors()
    if not errors:
        return "invalid request"
    first = errors[0]
    where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path"))
    return f"{where}: {first.get('msg')}" if where else str(first.get("msg"))


router = APIRouter(prefix="/console", route_class=ConsoleRoute, include_in_schema=False)


@dataclass(frozen=True, slots=True)
class NavItem:
    label: str
    path: str
    operator_only: bool
    customer_only: bool

    def shown_to(self, viewer: SignedIn) -> bool:
        admin = viewer.principal.is_admin
        return not (self.operator_only and not admin) and not (self.customer_only and admin)


NAV: list[NavItem] = []


def page(
    path: str, label: str | None = None, operator_only: bool = False, customer_only: bool = False
) -> Callable[[Callable[..., Awaitable[Response]]], Callable[..., Awaitable[Response]]]:
    """A GET page at `/console{path}`; with a `label`, an entry of the navigation too."""

    def register(
        endpoint: Callable[..., Awaitable[Response]],
    ) -> Callable[..., Awaitable[Response]]:
        if label is not None:
            target = f"/console{path}".rstrip("/") or "/console"
            NAV.append(NavItem(label, target, operator_only, customer_only))
        router.add_api_route(path, endpoint, methods=["GET"], response_class=HTMLResponse)
        return endpoint

    return register


# -- who is signed in, and CSRF -----------------------------------------------------------


async def _viewer(request: Request, session: Session, settings: Config) -> SignedIn:
    found = await sessions.resolve(session, request.cookies.get(COOKIE), settings.admin_token)
    if found is None:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise SignInRequired(target if request.method == "GET" else "/console")
    request.state.viewer = found
    return found


Viewer = Annotated[SignedIn, Depends(_viewer)]


async def _operator(viewer: Viewer) -> SignedIn:
    if not viewer.principal.is_admin:
        # As in the API: what only the operator may see does not exist for a customer.
        raise NotFound("not found")
    return viewer


Operator = Annotated[SignedIn, Depends(_operator)]


# A day typed in a form (`2027-01-31`) is that day's start in UTC, as every time of the
# console reads; anything else is passed on for the API's own reading of RFC 3339.
DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")


@dataclass(frozen=True, slots=True)
class Form:
    """An `application/x-www-form-urlencoded` body; blank fields read as absent."""

    fields: dict[str, str]
    # Every value of a field sent more than once (a group of checkboxes), in order.
    repeated: dict[str, list[str]] = field(default_factory=dict)

    def get(self, name: str) -> str | None:
        value = self.fields.get(name, "").strip()
        return value or None

    def every(self, name: str) -> list[str]:
        return [v.strip() for v in self.repeated.get(name, []) if v.strip()]

    def instant(self, name: str) -> str | None:
        """A time field: a day alone is its midnight UTC."""
        value = self.get(name)
        return f"{value}T00:00:00Z" if value and DAY.match(value) else value

    def idempotency_key(self) -> str | None:
        """The form's own key (`form_key()` in its template): posted twice, a double click
        or a resent request, it changes nothing the second time, as an API retry."""
        key = self.get("idempotency_key")
        if key is not None and len(key) > 255:
            raise Unprocessable("idempotency_key: at most 255 characters", param="body")
        return key

    def present(self, *names: str) -> dict[str, str | None]:
        """The named fields that were sent, blank ones as None (a PATCH clears them)."""
        return {n: self.get(n) for n in names if n in self.fields}


async def read_form(request: Request) -> Form:
    body = (await request.body()).decode("utf-8", "replace")
    parsed = parse_qs(body, keep_blank_values=True, max_num_fields=200)
    return Form({name: values[-1] for name, values in parsed.items()}, parsed)


async def _posted(request: Request, viewer: Viewer) -> Form:
    form = await read_form(request)
    presented = form.fields.get("csrf_token") or request.headers.get("x-csrf-token")
    if not sessions.csrf_matches(viewer.csrf_token, presented):
        raise CsrfFailed(
            "This form has expired or did not come from the console; reload the page and try again."
        )
    return form


Posted = Annotated[Form, Depends(_posted)]


def _blank_is_none(value: object) -> object:
    return value or None


# A filter left blank ("any") is none; a choice is read as the API reads it.
BlankIsNone = BeforeValidator(_blank_is_none)
ChosenPeriod = Annotated[Period | None, BlankIsNone]


def optional_uuid(value: str | None, param: str) -> uuid.UUID | None:
    """An id from a query (`query.account_id`) or a form (`body.account_id`)."""
    if value is None:
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        name = param.rpartition(".")[2]
        raise NotFound(f"{name} {value!r} not found", param=param) from None


# -- HTML ---------------------------------------------------------------------------------


def _int(value: int | None) -> str:
    return "—" if value is None else f"{value:,}"


def _compact(value: int) -> str:
    """Large counts for a glance (the exact figure is in the title beside it)."""
    for size, suffix in ((1_000_000_000, "B"), (1_000_000, "M"), (1_000, "k")):
        if abs(value) >= size:
            return f"{value / size:.1f}{suffix}".replace(".0", "")
    return str(value)


def _when(value: datetime | date | None) -> str:
    if value is None:
        return "—"
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return value.isoformat()


def _percent(share: Decimal | float) -> str:
    """A share for a glance: whole percents, one decimal below 10 % (so 0.05 % is not 0 %)."""
    value = Decimal(share) * 100
    return f"{value:.0f} %" if value >= 10 or value == 0 else f"{value:.1f} %"


ENV = Environment(
    loader=PackageLoader("service.console", "templates"),
    autoescape=select_autoescape(["html"]),
    trim_blocks=True,
    lstrip_blocks=True,
)
ENV.filters.update(
    usd=lambda v: "—" if v is None else format_usd(Decimal(v)),
    usd_cents=lambda v: "—" if v is None else format_usd(Decimal(v), cents=True),
    # Exact money as the API writes it: fixed-point, the stored scale kept (never "0E-12").
    exact=lambda v: "—" if v is None else fixed_point(Decimal(v)),
    rate=lambda v: "—" if v is None else format_rate(Decimal(v)),
    int=_int,
    compact=_compact,
    when=_when,
    percent=_percent,
    unit_price=unit_price,
)


@cache
def asset(path: str) -> str:
    """The URL of a file of `static/`, versioned by its content."""
    content = (files("service.console") / "static" / path).read_bytes()
    return f"{STATIC}/{path}?v={hashlib.sha256(content).hexdigest()[:12]}"


class ConsoleStatic(StaticFiles):
    """The console's files; a versioned URL is cached by the browser without asking again."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        if response.status_code == 200 and b"v=" in scope.get("query_string", b""):
            response.headers["Cache-Control"] = IMMUTABLE
        return response


def _form_key() -> str:
    return secrets.token_urlsafe(18)


# The package's own style sheet, never input: written into pages as it is.
STYLE_SHEET = Markup(CONSOLE_CSS)  # noqa: S704
ENV.globals.update(static=STATIC, asset=asset, form_key=_form_key, console_css=STYLE_SHEET)


def render(request: Request, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    viewer: SignedIn | None = getattr(request.state, "viewer", None)
    nav = [item for item in NAV if viewer is not None and item.shown_to(viewer)]
    html = ENV.get_template(template).render(
        request=request, viewer=viewer, nav=nav, path=request.url.path, **context
    )
    return HTMLResponse(html, status_code=status_code)


def error_page(request: Request, status_code: int, message: str) -> HTMLResponse:
    titles = {403: "Not allowed", 404: "Not found", 409: "Not possible now", 422: "Check the form"}
    return render(
        request,
        "error.html",
        status_code,
        title=titles.get(status_code, "Something went wrong"),
        message=message,
        status=status_code,
    )


def redirect(path: str) -> RedirectResponse:
    """After a POST, to the page that shows its result (a reload does not post again)."""
    return RedirectResponse(path, status_code=303)
