"""The monthly report: a row per account and model (and quoted task type), and totals.

Rendered as CSV or JSON while the rows arrive from a server-side cursor, so a month of any
size is exported in constant memory.
"""

from __future__ import annotations

import csv
import io
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

import orjson
from sqlalchemy.ext.asyncio import AsyncEngine

from service import schemas
from service.reports.repository import monthly_rows
from service.reports.schemas import COLUMNS, ReportFormat

# A row of the report query, by column name.
ReportRow = Mapping[Any, Any]
# Rows per chunk written to the client: big enough to keep the per-chunk overhead small.
CHUNK_ROWS = 500
TOKEN_COLUMNS = (
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "unpriced_requests",
)
# A spreadsheet runs a cell starting with one of these as a formula (CSV injection), also
# behind the spaces and line feeds it skips (` =1+1`); a tab or CR first is escaped too.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_SKIPPED_BEFORE_FORMULA = " \n"


def parse_period(period: str) -> tuple[datetime, datetime]:
    """`2026-11` → [2026-11-01T00:00Z, 2026-12-01T00:00Z); a 422 naming `query.period`."""
    month = schemas.parse_period(period)
    return month.start, month.end


def _money(value: Decimal | None) -> str | None:
    return None if value is None else format(value, "f")


@dataclass
class Totals:
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TOKEN_COLUMNS, 0))
    cost_usd: Decimal = Decimal(0)
    invoice_total_usd: Decimal | None = None
    _last_account: uuid.UUID | None = None

    def add(self, row: ReportRow) -> None:
        for name in TOKEN_COLUMNS:
            self.counts[name] += row[name]
        self.cost_usd += row["cost_usd"]
        # Rows of one account are adjacent; its invoice counts once.
        if row["account_id"] != self._last_account:
            self._last_account = row["account_id"]
            if row["invoice_total_usd"] is not None and row["invoice_status"] != "void":
                self.invoice_total_usd = (self.invoice_total_usd or Decimal(0)) + row[
                    "invoice_total_usd"
                ]

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.counts,
            "cost_usd": _money(self.cost_usd),
            "invoice_total_usd": _money(self.invoice_total_usd),
        }


def _line(row: ReportRow) -> dict[str, Any]:
    return {
        "account_id": str(row["account_id"]),
        "account_name": row["account_name"],
        "model": row["model"],
        "task_type": row["task_type"],
        **{name: row[name] for name in TOKEN_COLUMNS},
        "cost_usd": _money(row["cost_usd"]),
        "invoice_number": row["invoice_number"],
        "invoice_status": row["invoice_status"],
        "invoice_total_usd": _money(row["invoice_total_usd"]),
    }


def text_cell(value: str | None) -> str:
    """A CSV text cell a spreadsheet shows rather than runs (`=1+1` → `'=1+1`)."""
    if value is None:
        return ""
    return "'" + value if value.lstrip(_SKIPPED_BEFORE_FORMULA).startswith(FORMULA_START) else value


def _money_cell(value: Decimal | None) -> str:
    return "" if value is None else format(value, "f")


class CsvRenderer:
    def __init__(self, period: str) -> None:
        self.period = period
        self.buffer = io.StringIO()
        # CRLF (RFC 4180), and so the writer quotes every cell holding a CR or an LF: with
        # "\n" alone a bare CR stayed unquoted, and a spreadsheet would start a new row (and
        # run a formula) right behind the `'` that defused the cell.
        self.writer = csv.writer(self.buffer, lineterminator="\r\n")

    def _take(self) -> bytes:
        chunk = self.buffer.getvalue().encode()
        self.buffer.seek(0)
        self.buffer.truncate()
        return chunk

    def header(self) -> bytes:
        self.writer.writerow(COLUMNS)
        return self._take()

    def rows(self, rows: Iterable[ReportRow]) -> bytes:
        # Straight from the database row to the cells, in COLUMNS order: this is the
        # per-row cost of a large export.
        period = self.period
        self.writer.writerows(
            (
                "line",
                period,
                str(r["account_id"]),
                text_cell(r["account_name"]),
                text_cell(r["model"]),
                text_cell(r["task_type"]),
                r["requests"],
                r["prompt_tokens"],
                r["completion_tokens"],
                r["total_tokens"],
                r["cached_tokens"],
                r["reasoning_tokens"],
                format(r["cost_usd"], "f"),
                r["unpriced_requests"],
                r["invoice_number"] or "",
                r["invoice_status"] or "",
                _money_cell(r["invoice_total_usd"]),
            )
            for r in rows
        )
        return self._take()

    def footer(self, totals: dict[str, Any]) -> bytes:
        record = {"row_type": "total", "period": self.period, **totals}
        self.writer.writerow("" if record.get(c) is None else record[c] for c in COLUMNS)
        return self._take()


class JsonRenderer:
    """`{"period": …, "data": [\\n row,\\n row\\n], "totals": {…}}`, one row per line."""

    def __init__(self, period: str) -> None:
        self.period = period
        self.first = True

    def header(self) -> bytes:
        return b'{"period":' + orjson.dumps(self.period) + b',"data":['

    def rows(self, rows: Iterable[ReportRow]) -> bytes:
        parts = []
        for row in rows:
            parts.append(b"\n" if self.first else b",\n")
            parts.append(orjson.dumps(_line(row)))
            self.first = False
        return b"".join(parts)

    def footer(self, totals: dict[str, Any]) -> bytes:
        return b'\n],"totals":' + orjson.dumps(totals) + b"}\n"


async def export_monthly(
    engine: AsyncEngine, period: str, fmt: ReportFormat, account_id: uuid.UUID | None
) -> AsyncIterator[bytes]:
    """The report as chunks of bytes. Holds one database connection while it streams."""
    start, end = parse_period(period)
    renderer = CsvRenderer(period) if fmt == "csv" else JsonRenderer(period)
    totals = Totals()
    yield renderer.header()
    async with engine.connect() as connection:
        async for rows in monthly_rows(connection, period, start, end, account_id, CHUNK_ROWS):
            for row in rows:
                totals.add(row)
            yield renderer.rows(rows)
    yield renderer.footer(totals.as_dict())
