"""The one declarative base, with a constraint naming convention so migrations stay stable."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Any, Generic, TypeVar

from sqlalchemy import BigInteger, CheckConstraint, DateTime, Dialect, MetaData, Numeric, String
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


E = TypeVar("E", bound=StrEnum)


class Vocabulary(TypeDecorator[E], Generic[E]):
    """A column holding one value of a StrEnum, stored as its text (`varchar(length)`) and
    read back as the enum member; its check constraint is `one_of(column, enum)`."""

    impl = String
    cache_ok = True

    def __init__(self, vocabulary: type[E], length: int) -> None:
        super().__init__(length)
        self.vocabulary = vocabulary

    def process_bind_param(self, value: Any, dialect: Dialect) -> str | None:
        return None if value is None else self.vocabulary(value).value

    def process_result_value(self, value: Any, dialect: Dialect) -> E | None:
        return None if value is None else self.vocabulary(value)


def one_of(column: str, vocabulary: type[StrEnum], nullable: bool = False) -> CheckConstraint:
    """The check that `column` holds one of the enum's values (or NULL), named after the
    column. The SQL lists the values in the enum's order, as the migrations wrote it."""
    values = ", ".join(f"'{member.value}'" for member in vocabulary)
    condition = f"{column} IN ({values})"
    if nullable:
        condition = f"{column} IS NULL OR {condition}"
    info = {"vocabulary": vocabulary, "column": column}
    return CheckConstraint(condition, name=column, info=info)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
