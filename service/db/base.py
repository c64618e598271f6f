"""The one declarative base, with a constraint naming convention so migrations stay stable."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any

from sqlalchemy import BigInteger, DateTime, Dialect, MetaData, Numeric
from sqlalchemy.orm import DeclarativeBase, mapped_column
from sqlalchemy.types import TypeDecorator

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Exact money: 12 decimal places holds the cost of a single token at any list price.
ExactUSD = Annotated[Decimal, mapped_column(Numeric(24, 12))]
# Rounded money, as it appears on an invoice.
CentsUSD = Annotated[Decimal, mapped_column(Numeric(18, 2))]
# A list price in USD per million tokens.
RateUSD = Annotated[Decimal, mapped_column(Numeric(18, 6))]
UTCDateTime = Annotated[datetime, mapped_column(DateTime(timezone=True))]


class TokenCount(TypeDecorator[int]):
    """A count of tokens: `bigint` (providers report counts past 2³¹).

    Postgres sums a `bigint` as `numeric`; a sum or coalesce of this column still reads
    back as an int, not a Decimal.
    """

    impl = BigInteger
    cache_ok = True

    def process_result_value(self, value: Any, dialect: Dialect) -> int | None:
        return None if value is None else int(value)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
