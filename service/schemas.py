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
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any, Generic, TypeVar

from fastapi import Query
from pydantic import AfterValidator, BaseModel, Field, PlainSerializer

from service.errors import Unprocessable

T = TypeVar("T")


def _fixed_point(value: Decimal) -> str:
    # str(Decimal) would render a NUMERIC zero with scale 12 as "0E-12"; money is always
    # written in plain fixed-point notation, keeping the stored scale.
    return format(value, "f")


# Exact money in JSON: a decimal string in fixed-point notation, never a float.
DecimalString = Annotated[
    Decimal, PlainSerializer(_fixed_point, return_type=str, when_used="json-unless-none")
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


class Page(BaseModel, Generic[T]):
    data: list[T]
    has_more: bool = Field(description="Whether another page follows.")
    next_cursor: str | None = Field(
        description="Pass as `cursor` to get the next page; null on the last page."
    )


Limit = Annotated[int, Query(ge=1, le=200, description="Page size.")]
CursorParam = Annotated[
    str | None,
    Query(max_length=512, description="`next_cursor` of the previous page."),
]


def encode_cursor(*key: str) -> str:
    raw = json.dumps(list(key), separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, *parsers: Callable[[str], Any]) -> tuple[Any, ...]:
    """The sort key inside `cursor`, each part read by its parser.

    A cursor that is not one of ours (tampered, truncated, from another endpoint) is a 422
    naming `cursor`, never a 500.
    """
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        key = json.loads(raw)
        if not isinstance(key, list) or len(key) != len(parsers):
            raise ValueError("wrong shape")
        return tuple(parse(str(part)) for parse, part in zip(parsers, key, strict=True))
    except (binascii.Error, ValueError, TypeError):
        raise Unprocessable(
            "query.cursor: not a cursor returned by this endpoint", param="query.cursor"
        ) from None
