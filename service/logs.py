"""Structured logs: one key=value line per event, with the request id. Secrets are never
passed to a logger.

Every event is logged as `log.info("event=name key=%s other=%d", value, count)`: the
literal parts are keys and fixed words, the values are arguments, and the formatter writes
each value as `log_value` does — quoted when it holds a space, a quote, an `=` or a
character that is not printable — so a message from Postgres or a customer's text stays one
field of one line. A line written while the billing API answers a request ends with its
`request_id`, the one the response's `x-request-id` carries (`RequestIds`).
"""

from __future__ import annotations

import copy
import logging
import numbers
import re
import sys
from contextvars import ContextVar
from datetime import UTC, datetime

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.ledger.record import new_request_id

# The id of the billing API request being answered (None outside one).
REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)

_PLAIN = re.compile(r'[^\s"=\\]+')
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def log_value(value: object) -> object:
    """A logged value as it appears in the line: numbers as they are (`%d` still applies),
    anything else as text, in double quotes with escapes when it would not read as one
    value (empty, spaces, quotes, `=`, control or other unprintable characters)."""
    if isinstance(value, numbers.Number):
        return value
    text = str(value)
    if _PLAIN.fullmatch(text) and text.isprintable():
        return text
    escaped = "".join(_ESCAPES.get(c, c if c.isprintable() else f"\\u{ord(c):04x}") for c in text)
    return f'"{escaped}"'


class KeyValueFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("ts=%(asctime)s level=%(levelname)s logger=%(name)s %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        # RFC 3339 in UTC, to the millisecond: one value, like every other field.
        at = datetime.fromtimestamp(record.created, UTC)
        return at.isoformat(timespec="milliseconds").replace("+00:00", "Z")

    def format(self, record: logging.LogRecord) -> str:
        args = record.args
        if isinstance(args, tuple) and args:
            record = copy.copy(record)  # other handlers see the record as it was logged
            record.args = tuple(log_value(arg) for arg in args)
        return super().format(record)

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        request_id = REQUEST_ID.get()
        return f"{line} request_id={request_id}" if request_id else line


def configure_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter())
    root = logging.getLogger("meterline")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


# The proxy's own paths: their `x-request-id` is the ledger row's (service/proxy).
_PROXY_PREFIX = "/v1/"
# A client's own id is kept when it is plain enough to log as is.
_GIVEN = re.compile(rb"[A-Za-z0-9._:-]{1,128}")


class RequestIds:
    """ASGI middleware: every response but the proxy's gets an `x-request-id` — the client's
    when it sent a usable one, else a new time-ordered one — and every log line written
    while answering ends with it. Outermost, so error pages and 500s carry it too."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(_PROXY_PREFIX):
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"")
        request_id = given.decode() if _GIVEN.fullmatch(given) else new_request_id()
        header = (b"x-request-id", request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0].lower() != header[0]]
                message["headers"] = [*headers, header]
            await send(message)

        token = REQUEST_ID.set(request_id)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            REQUEST_ID.reset(token)
