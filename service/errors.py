"""One error base class carrying its HTTP status, rendered in one body shape everywhere.

The shape is OpenAI's, `{"error": {"message", "type", "code", "param"}}`, so a client
written for the provider understands Meterline's errors, on the proxy and the billing API.

Each code of the billing API is a class that knows its status, type, code and what it
means; an endpoint declares the classes it may raise (`responses=errors(PeriodNotOver, …)`)
and its OpenAPI entry is made from them, so what is documented is what is raised. Domain
errors live beside the service that raises them; the ones every domain shares are here.

`param` names what an error is about the way the client sent it. On the billing API (and
the console) that is where it was sent and its name, as FastAPI's validation names it:
`body.tier`, `query.period`, `path.invoice_id`. On the OpenAI-compatible proxy it is
OpenAI's own name, which OpenAI's clients read: a body field bare (`model`, `messages`),
a header by its lower-case name (`x-task-id`).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, ClassVar

from pydantic import BaseModel


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: str | None = None
    param: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class MeterlineError(Exception):
    status_code: ClassVar[int] = 400
    type: ClassVar[str] = "invalid_request_error"
    code: str | None = "invalid_request"
    # What the code means, for the OpenAPI description of the operations that raise it.
    description: ClassVar[str] = "The request is invalid."
    # Headers every answer of this error carries, with their OpenAPI schema type.
    documented_headers: ClassVar[dict[str, str]] = {}

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        code: str | None = None,
    ) -> None:
        """`code` overrides the class's only for the proxy's OpenAI-shaped refusals, which
        no OpenAPI operation lists; a code of the billing API is a class of its own."""
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.code, self.param)


def error_body(
    message: str, type_: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "code": code, "param": param}}


def errors(*kinds: type[MeterlineError]) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI `responses` of an operation that may raise `kinds`: per status, the error
    body, a description listing each code, and an example per class (keyed by its name)."""
    by_status: dict[int, list[type[MeterlineError]]] = defaultdict(list)
    for kind in kinds:
        if kind not in by_status[kind.status_code]:
            by_status[kind.status_code].append(kind)
    responses: dict[int | str, dict[str, Any]] = {}
    for status, group in sorted(by_status.items()):
        entry: dict[str, Any] = {
            "model": ErrorBody,
            "description": "\n\n".join(f"`{kind.code}`: {kind.description}" for kind in group),
            "content": {
                "application/json": {
                    "examples": {
                        kind.__name__: {
                            "summary": kind.description,
                            "value": error_body(kind.description, kind.type, kind.code),
                        }
                        for kind in group
                    }
                }
            },
        }
        headers = {name: t for kind in group for name, t in kind.documented_headers.items()}
        if headers:
            entry["headers"] = {name: {"schema": {"type": t}} for name, t in headers.items()}
        responses[status] = entry
    return responses


class BadRequest(MeterlineError):
    status_code = 400


class MalformedRequest(BadRequest):
    code = "http_error"
    description = "The body cannot be read at all (not even as text)."


class ConflictingCredentials(BadRequest):
    code = "conflicting_credentials"
    description = "`Authorization` and `X-API-Key` carry different keys: send one."


class Unauthorized(MeterlineError):
    status_code = 401
    type = "authentication_error"
    code = "invalid_api_key"
    description = "Missing, unknown, revoked or expired credential."


class Forbidden(MeterlineError):
    status_code = 403
    type = "permission_error"
    code = "forbidden"
    description = "A customer key asked for what only the admin token may do."


class NotFound(MeterlineError):
    status_code = 404
    code = "not_found"
    description = "No such object visible to the caller."


class MethodNotAllowed(MeterlineError):
    status_code = 405
    code = "method_not_allowed"
    description = "The path does not take this method."


class RequestTimeout(MeterlineError):
    status_code = 408
    code = "request_timeout"
    description = "The body did not arrive within `METERLINE_CLIENT_BODY_TIMEOUT_S`."


class Conflict(MeterlineError):
    status_code = 409
    code = "conflict"
    description = "Not possible in the object's state."


class PayloadTooLarge(MeterlineError):
    status_code = 413
    code = "request_too_large"
    description = "The body is larger than `METERLINE_MAX_REQUEST_BODY_BYTES`."


class Unprocessable(MeterlineError):
    status_code = 422
    code = "validation_error"
    description = "Invalid parameter; `error.param` names it."


class RateLimited(MeterlineError):
    status_code = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"
    description = "A rate limit of the key or its account is reached: retry later."


class NotInstalled(MeterlineError):
    """A feature of an optional extra this server was installed without (Parquet: pyarrow)."""

    status_code = 501
    type = "api_error"
    code = "extra_not_installed"
    description = "The feature needs an optional extra the server lacks; the message names it."


class DatabaseUnavailable(MeterlineError):
    """Postgres cannot be reached: the billing API says so and when to retry (the proxy keeps
    serving known keys, spooling their usage)."""

    status_code = 503
    type = "api_error"
    code = "database_unavailable"
    description = "The database is unavailable: retry after `Retry-After` seconds."
    documented_headers = {"Retry-After": "integer"}
    retry_after_s = 5

    def __init__(self, message: str = "the database is unavailable; retry shortly") -> None:
        super().__init__(message, headers={"Retry-After": str(self.retry_after_s)})


# What any operation of the billing API may answer, whatever it does: a body that cannot be
# read, two different credentials, none that is valid, an object the caller cannot see, a
# body past the limit, an invalid parameter, a database that cannot be reached. Routers
# declare these; a route that raises more declares `errors(*API_ERRORS, …)`, as FastAPI
# replaces the router's entry for a status by the route's.
API_ERRORS: tuple[type[MeterlineError], ...] = (
    MalformedRequest,
    ConflictingCredentials,
    Unauthorized,
    NotFound,
    PayloadTooLarge,
    Unprocessable,
    DatabaseUnavailable,
)
