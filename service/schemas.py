"""Pieces the billing API's schemas share: exact money as strings, UTC times, cursor pages.

A cursor is opaque to clients (base64url of a small JSON array holding the sort key of the
last row returned); the next page is everything strictly after that key. Unlike OFFSET,
this stays stable when rows are inserted between two requests and costs one index range
scan however deep the page.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any, Generic, TypeVar, cast

from fastapi import Query
from pydantic import (
    AfterValidator,
    BaseModel,
    Field,
    GetCoreSchemaHandler,
    PlainSerializer,
    PlainValidator,
    TypeAdapter,
    ValidationError,
    WithJsonSchema,
)
from pydantic_core import CoreSchema, core_schema

from pricing.invoice import PERIOD_PATTERN, BillingPeriod
from pricing.prices import BEGINNING_OF_TIME, END_OF_TIME
from service.errors import Unprocessable
from service.ledger.record import CONTROL_CHARACTERS

T = TypeVar("T")
R = TypeVar("R")
P = TypeVar("P", bound=BaseModel)


def fixed_point(value: Decimal) -> str:
    # str(Decimal) would render a NUMERIC zero with scale 12 as "0E-12"; money is always
    # written in plain fixed-point notation, keeping the stored scale.
    return format(value, "f")


# Exact money in JSON: a decimal string in fixed-point notation, never a float.
DecimalString = Annotated[
    Decimal, PlainSerializer(fixed_point, return_type=str, when_used="json-unless-none")
]


def as_utc(value: datetime) -> datetime:
    """RFC 3339 times carry an offset; one sent without is read as UTC rather than refused.

    A ValueError for an instant that UTC cannot hold (0001-01-01T00:00+01:00), so that in a
    validator it is a 422 naming the field.
    """
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("out of range once converted to UTC") from None


# A time parameter or field, read as RFC 3339 and held in UTC.
UTCTime = Annotated[datetime, AfterValidator(as_utc)]


def _billable(value: datetime) -> datetime:
    if not BEGINNING_OF_TIME <= value < END_OF_TIME:
        raise ValueError("must be from 1970-01-01 to 9999-11-30 (UTC)")
    return value


# For a time that is stored (a price's start, a key's expiry): within the months Meterline
# bills. Outside, Postgres keeps the first instant of year 1 as -infinity (read back as a
# naive datetime) and a datetime cannot hold the end of 9999-12.
Billable = AfterValidator(_billable)
BillableTime = Annotated[UTCTime, Billable]

# Control characters: C0 (NUL above all: Postgres text cannot hold it), DEL and C1; a
# person's free text may hold line breaks and tabs.
NO_CONTROL_CHARACTERS = rf"^[^{CONTROL_CHARACTERS}]*$"
NO_CONTROL_CHARACTERS_BUT_LINES = r"^[^\x00-\x08\x0b-\x1f\x7f-\x9f]*$"
CONTROL_CHARACTERS_MESSAGE = "must not contain control characters (U+0000-U+001F, U+007F-U+009F)"


class _NoControlCharacters:
    """Refuse control characters as a pattern of the string schema itself.

    Lengths and the like given next to it (`Query(max_length=…)`, `Field(min_length=…)`)
    join the same string schema, and OpenAPI documents the pattern, so clients and fuzzers
    know the rule.
    """

    def __init__(self, pattern: str = NO_CONTROL_CHARACTERS) -> None:
        self.pattern = pattern

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        schema = handler(source)
        if schema["type"] != "str":
            raise TypeError("Text constrains plain strings only")
        cast(core_schema.StringSchema, schema)["pattern"] = self.pattern
        return schema


# Every string of the billing API that a client sends (query, path, body, cursor): text
# Postgres can store and compare, and a header can carry. Give it no other `pattern`, which
# would replace this one; check further rules in a validator.
Text = Annotated[str, _NoControlCharacters()]
# What a person writes at length (a review's note): the same, line breaks and tabs allowed.
Prose = Annotated[str, _NoControlCharacters(NO_CONTROL_CHARACTERS_BUT_LINES)]


def _period(value: object) -> BillingPeriod:
    if isinstance(value, BillingPeriod):
        return value
    if not isinstance(value, str):
        raise ValueError("period must be a month YYYY-MM")
    return BillingPeriod.parse(value)  # the one reading of YYYY-MM: a ValueError names the range


# A UTC calendar month, `YYYY-MM`, from 1970-01 to 9999-11, for every query parameter and
# body field that names one. One validator, so each bad month gets the same 422 wherever it
# is sent; the pattern is only documented (pydantic's own check would word it differently).
Period = Annotated[
    BillingPeriod,
    PlainValidator(_period, json_schema_input_type=str),
    PlainSerializer(str, return_type=str),
    WithJsonSchema({"type": "string", "pattern": PERIOD_PATTERN, "examples": ["2026-11"]}),
]


class Page(BaseModel, Generic[T]):
    data: list[T]
    has_more: bool = Field(description="Whether another page follows.")
    next_cursor: str | None = Field(
        description="Pass as `cursor` to get the next page; null on the last page."
    )


Limit = Annotated[int, Query(ge=1, le=200, description="Page size.")]
CursorParam = Annotated[
    Text | None,
    Query(max_length=512, description="`next_cursor` of the previous page."),
]

# What a cursor's parts may be, each read as the API reads such a value from a client: a
# forged cursor is client input like any other.
CursorPart = type[datetime] | type[str] | type[uuid.UUID]
_CURSOR_PARTS: dict[CursorPart, TypeAdapter[Any]] = {
    datetime: TypeAdapter(UTCTime),
    str: TypeAdapter(Text),
    uuid.UUID: TypeAdapter(uuid.UUID),
}


def encode_cursor(*key: str) -> str:
    raw = json.dumps(list(key), separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, *parts: CursorPart) -> tuple[Any, ...]:
    """The sort key inside `cursor`, each part validated as its kind (`datetime`: an RFC 3339
    time in UTC's range; `str`: Text; `uuid.UUID`).

    A cursor that is not one of ours (tampered, truncated, forged, from another endpoint)
    is a 422 naming `cursor`, never a 500.
    """
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        key = json.loads(raw)
        if not isinstance(key, list) or len(key) != len(parts):
            raise ValueError("wrong shape")
        return tuple(
            _CURSOR_PARTS[kind].validate_python(value)
            for kind, value in zip(parts, key, strict=True)
        )
    except (binascii.Error, ValueError, TypeError, ValidationError):
        raise Unprocessable(
            "query.cursor: not a cursor returned by this endpoint", param="query.cursor"
        ) from None


def keyset_page(
    page: type[P],
    rows: Sequence[R],
    limit: int,
    out: Callable[[R], Any],
    position: Callable[[R], Sequence[str]],
    **fields: Any,
) -> P:
    """One page of a keyset-paged list: `rows` as read, up to `limit + 1` (the one more says
    that another page follows), each shaped by `out`; the next cursor is the position (the
    sort key, as strings) of the page's last row. `fields`: the rest of the page's body."""
    shown = rows[:limit]
    more = len(rows) > limit
    return page(
        **fields,
        data=[out(row) for row in shown],
        has_more=more,
        next_cursor=encode_cursor(*position(shown[-1])) if more and shown else None,
    )


def links(**to: tuple[str, str, dict[str, str]]) -> dict[str, Any]:
    """OpenAPI links of a response: `Name=(method, path, {parameter: expression})`, the
    parameters named `in.name` and taken from this response (`$response.body#/id`).

    They say which operation takes what a create returns (clients, and schemathesis'
    stateful tests, follow them).
    """
    return {
        "links": {
            name: {
                "operationRef": "#/paths/"
                + path.replace("~", "~0").replace("/", "~1")
                + "/"
                + method.lower(),
                "parameters": parameters,
            }
            for name, (method, path, parameters) in to.items()
        }
    }
