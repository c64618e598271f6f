"""One error base class carrying its HTTP status, rendered in one body shape everywhere.

The shape is OpenAI's, `{"error": {"message", "type", "code", "param"}}`, so a client
written for the provider understands Meterline's errors, on the proxy and the billing API.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: str | None = None
    param: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class MeterlineError(Exception):
    status_code: int = 400
    type: str = "invalid_request_error"
    code: str | None = "invalid_request"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        status_code: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status_code is not None:
            self.status_code = status_code
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.code, self.param)


def error_body(
    message: str, type_: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "code": code, "param": param}}


class BadRequest(MeterlineError):
    status_code = 400


class Unauthorized(MeterlineError):
    status_code = 401
    type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(MeterlineError):
    status_code = 403
    type = "permission_error"
    code = "forbidden"


class NotFound(MeterlineError):
    status_code = 404
    code = "not_found"


class Conflict(MeterlineError):
    status_code = 409
    code = "conflict"


class Unprocessable(MeterlineError):
    status_code = 422
    code = "validation_error"


class PayloadTooLarge(MeterlineError):
    status_code = 413
    code = "request_too_large"


class RateLimited(MeterlineError):
    status_code = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class UpstreamError(MeterlineError):
    status_code = 502
    type = "api_error"
    code = "upstream_unavailable"


class DatabaseUnavailable(MeterlineError):
    """Postgres cannot be reached: the billing API says so and when to retry (the proxy keeps
    serving known keys, spooling their usage)."""

    status_code = 503
    type = "api_error"
    code = "database_unavailable"
    retry_after_s = 5

    def __init__(self, message: str = "the database is unavailable; retry shortly") -> None:
        super().__init__(message, headers={"Retry-After": str(self.retry_after_s)})
