"""One vocabulary per status: each is a StrEnum, the column's type, its check constraint and
its API schema.

The constraints are found in the models (every `one_of` check), so a new one is held to
the same rule; the database's own constraint, built by the migrations, is asked which
values it admits.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from sqlalchemy import CheckConstraint

from service.app import create_app
from service.db.base import Base, Vocabulary
from service.settings import Settings
from tests.support import Database

# Not a value of any vocabulary; an upper-cased member must be refused too (Postgres compares
# text exactly).
STRANGERS = ["", "unknown", "NONE", "Draft"]


def vocabulary_checks() -> list[tuple[str, str, str, type[StrEnum]]]:
    """(table, column, constraint name, enum) of every vocabulary check of the models."""
    found = []
    for table in Base.metadata.sorted_tables:
        for constraint in table.constraints:
            if isinstance(constraint, CheckConstraint) and "vocabulary" in constraint.info:
                column = str(constraint.info["column"])
                found.append(
                    (table.name, column, str(constraint.name), constraint.info["vocabulary"])
                )
    return found


def test_every_vocabulary_column_has_its_check_and_the_same_enum() -> None:
    checks = {(table, column): enum for table, column, _, enum in vocabulary_checks()}
    assert len(checks) >= 11, checks
    typed = {
        (table.name, column.name): column.type.vocabulary
        for table in Base.metadata.sorted_tables
        for column in table.columns
        if isinstance(column.type, Vocabulary)
    }
    assert typed == checks


def _admitted(db: Database, table: str, column: str, name: str, values: list[str]) -> set[str]:
    """The values the database's constraint `name` lets `column` hold: its expression
    evaluated for each value, in the column's own type."""
    definition: str | None = db.fetchval(
        "SELECT pg_get_constraintdef(c.oid) FROM pg_constraint c"
        " WHERE c.conrelid = $1::regclass AND c.conname = $2 AND c.contype = 'c'",
        table,
        name,
    )
    assert definition is not None, f"{table}: no check constraint {name}"
    expression = definition.removeprefix("CHECK ")
    column_type = db.fetchval(
        "SELECT format_type(atttypid, atttypmod) FROM pg_attribute"
        " WHERE attrelid = $1::regclass AND attname = $2",
        table,
        column,
    )
    rows = db.fetch(
        f"SELECT v, {expression} AS ok FROM unnest($1::text[]) AS u(v),"
        f" LATERAL (SELECT v::{column_type} AS {column}) AS t",
        values,
    )
    return {r["v"] for r in rows if r["ok"]}


def test_each_check_constraint_admits_exactly_its_enums_values(db: Database) -> None:
    for table, column, name, enum in vocabulary_checks():
        members = [m.value for m in enum]
        tried = members + STRANGERS + [m.upper() for m in members]
        assert _admitted(db, table, column, name, tried) == set(members), (table, column)


# Internal columns: the ledger's kind, and the series of the number counters (invoices and
# credit notes show their numbers, not the counters).
_NOT_IN_THE_API = {("usage_ledger", "kind"), ("invoice_number_counters", "series")}


def test_the_api_documents_each_vocabulary_with_the_enums_values() -> None:
    spec: dict[str, Any] = create_app(Settings(database_url="postgresql://unused/none")).openapi()
    schemas = spec["components"]["schemas"]
    for table, column, _, enum in vocabulary_checks():
        if (table, column) in _NOT_IN_THE_API:
            continue
        assert schemas[enum.__name__]["enum"] == [m.value for m in enum], (table, column)
