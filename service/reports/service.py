"""The monthly report: a line per account, kind, model (and quoted task type), and totals.

Its billed amounts follow the invoices' rules: usage no quoted task covers is billed its
exact cost (rows stored without a price priced by the version in force at their time, as
a draft prices them), usage a quoted task covers is billed through the task, and a quoted
task completed in the month is billed as fixed at its completion. So each account's
`billed_usd` adds up to its invoice's exact total, but for the month's rows recorded after
that invoice was finalized (billed as late usage on a later invoice) and the late lines
that invoice carries for earlier months.

Rendered as CSV or JSON while the rows arrive from a server-side cursor, so a month of any
size is exported in constant memory.

The unpriced-usage report: the month's rows stored without a price, per account and model.
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
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from pricing.cost import totals_cost
from pricing.invoice import BillingPeriod, TaskBilling, UsageTotals, task_charge
from pricing.prices import PriceBook
from service.db.engine import tune_for_aggregation
from service.prices.repository import PriceRepository
from service.reports.repository import (
    UnpricedUsageRepository,
    monthly_rows,
    unpriced_models,
    unpriced_sums,
)
from service.reports.schemas import (
    COLUMNS,
    FORMULA_START,
    SKIPPED_BEFORE_FORMULA,
    ReportFormat,
    UnpricedReportRow,
)

# A row of the report query, by column name.
ReportRow = Mapping[Any, Any]
# Rows per chunk written to the client: big enough to keep the per-chunk overhead small.
CHUNK_ROWS = 500
TOKEN_COLUMNS = (
    "tasks",
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "unpriced_requests",
)


def _money(value: Decimal | None) -> str | None:
    return None if value is None else format(value, "f")


@dataclass
class Totals:
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TOKEN_COLUMNS, 0))
    cost_usd: Decimal = Decimal(0)
    billed_usd: Decimal = Decimal(0)
    invoice_total_usd: Decimal | None = None
    invoice_credited_usd: Decimal | None = None
    invoice_amount_due_usd: Decimal | None = None
    _last_account: uuid.UUID | None = None

    def add(self, row: ReportRow) -> None:
        for name in TOKEN_COLUMNS:
            self.counts[name] += row[name]
        self.cost_usd += row["cost_usd"]
        self.billed_usd += row["billed_usd"]
        # Rows of one account are adjacent; its invoice counts once.
        if row["account_id"] != self._last_account:
            self._last_account = row["account_id"]
            if row["invoice_total_usd"] is not None and row["invoice_status"] != "void":
                self.invoice_total_usd = _plus(self.invoice_total_usd, row["invoice_total_usd"])
                self.invoice_credited_usd = _plus(
                    self.invoice_credited_usd, row["invoice_credited_usd"]
                )
                self.invoice_amount_due_usd = _plus(
                    self.invoice_amount_due_usd, row["invoice_amount_due_usd"]
                )

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.counts,
            "cost_usd": _money(self.cost_usd),
            "billed_usd": _money(self.billed_usd),
            "invoice_total_usd": _money(self.invoice_total_usd),
            "invoice_credited_usd": _money(self.invoice_credited_usd),
            "invoice_amount_due_usd": _money(self.invoice_amount_due_usd),
        }


def _plus(total: Decimal | None, value: Decimal) -> Decimal:
    return (total or Decimal(0)) + value


def _line(row: ReportRow) -> dict[str, Any]:
    return {
        "account_id": str(row["account_id"]),
        "account_name": row["account_name"],
        "kind": row["kind"],
        "model": row["model"],
        "task_type": row["task_type"],
        **{name: row[name] for name in TOKEN_COLUMNS},
        "cost_usd": _money(row["cost_usd"]),
        "billed_usd": _money(row["billed_usd"]),
        "invoice_number": row["invoice_number"],
        "invoice_status": row["invoice_status"],
        "invoice_total_usd": _money(row["invoice_total_usd"]),
        "invoice_credited_usd": _money(row["invoice_credited_usd"]),
        "invoice_amount_due_usd": _money(row["invoice_amount_due_usd"]),
    }


def text_cell(value: str | None) -> str:
    """A CSV text cell a spreadsheet shows rather than runs (`=1+1` → `'=1+1`); the raw
    usage export applies the same rule in SQL (`service.reports.repository.text_cell_sql`)."""
    if value is None:
        return ""
    return "'" + value if value.lstrip(SKIPPED_BEFORE_FORMULA).startswith(FORMULA_START) else value


def _money_cell(value: Decimal | None) -> str:
    return "" if value is None else format(value, "f")


class CsvSheet:
    """Every CSV export's writer: cells written by `writer`, then taken as a chunk of bytes.
    Text cells a person or a client chose go through `text_cell`."""

    def __init__(self) -> None:
        self.buffer = io.StringIO()
        # CRLF (RFC 4180), and so the writer quotes every cell holding a CR or an LF: with
        # "\n" alone a bare CR stayed unquoted, and a spreadsheet would start a new row (and
        # run a formula) right behind the `'` that defused the cell.
        self.writer = csv.writer(self.buffer, lineterminator="\r\n")

    def take(self) -> bytes:
        chunk = self.buffer.getvalue().encode()
        self.buffer.seek(0)
        self.buffer.truncate()
        return chunk


class CsvRenderer(CsvSheet):
    def __init__(self, period: str) -> None:
        super().__init__()
        self.period = period

    def header(self) -> bytes:
        self.writer.writerow(COLUMNS)
        return self.take()

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
                r["kind"],
                text_cell(r["model"]),
                text_cell(r["task_type"]),
                r["tasks"],
                r["requests"],
                r["prompt_tokens"],
                r["completion_tokens"],
                r["total_tokens"],
                r["cached_tokens"],
                r["reasoning_tokens"],
                format(r["cost_usd"], "f"),
                r["unpriced_requests"],
                format(r["billed_usd"], "f"),
                r["invoice_number"] or "",
                r["invoice_status"] or "",
                _money_cell(r["invoice_total_usd"]),
                _money_cell(r["invoice_credited_usd"]),
                _money_cell(r["invoice_amount_due_usd"]),
            )
            for r in rows
        )
        return self.take()

    def footer(self, totals: dict[str, Any]) -> bytes:
        record = {"row_type": "total", "period": self.period, **totals}
        self.writer.writerow("" if record.get(c) is None else record[c] for c in COLUMNS)
        return self.take()


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


# A line's identity in the stream: task lines of one key arrive as one row per billing.
LineKey = tuple[uuid.UUID, str, str, str | None]


@dataclass
class _Repricing:
    """What rows stored without a price add now, priced as a draft prices them."""

    # (account, kind, model, task type) → (exact cost added, requests priced).
    usage: dict[LineKey, tuple[Decimal, int]] = field(default_factory=dict)
    # (account, 'task', task model, task type) → cost added to tasks billed at cost.
    tasks: dict[LineKey, Decimal] = field(default_factory=dict)


async def _repricing(
    connection: AsyncConnection, start: datetime, end: datetime, account_id: uuid.UUID | None
) -> _Repricing:
    found = _Repricing()
    models = await unpriced_models(connection, start, end, account_id)
    if not models:
        return found
    async with AsyncSession(bind=connection) as session:
        book = PriceBook(await PriceRepository(session).all_prices())
    segments = {model: book.segments(model) for model in models}
    usage, tasks = await unpriced_sums(connection, start, end, account_id, segments)
    for r in usage:
        price = segments[r["model"]][r["segment"]].price
        if price is not None:
            key = (r["account_id"], r["kind"], r["model"], r["task_type"])
            cost, requests = found.usage.get(key, (Decimal(0), 0))
            added = totals_cost(_totals(r).as_usage(), price)
            found.usage[key] = (cost + added, requests + r["requests"])
    for r in tasks:
        price = segments[r["model"]][r["segment"]].price
        if price is not None:
            key = (r["account_id"], "task", r["task_model"], r["task_type"])
            added = totals_cost(_totals(r).as_usage(), price)
            found.tasks[key] = found.tasks.get(key, Decimal(0)) + added
    return found


def _totals(row: ReportRow) -> UsageTotals:
    return UsageTotals(
        row["requests"], row["prompt_tokens"], row["completion_tokens"], row["cached_tokens"]
    )


def _line_of(row: ReportRow, repricing: _Repricing) -> dict[str, Any]:
    """A report line from a query row: rows without a price priced now, and billed."""
    line = dict(row)
    key: LineKey = (row["account_id"], row["kind"], row["model"], row["task_type"])
    if row["kind"] == "task":
        billing = TaskBilling(row["charge_billed_as"])
        cost = row["charge_cost_usd"]
        if billing is TaskBilling.COST:
            cost += repricing.tasks.get(key, Decimal(0))
        line["billed_usd"] = task_charge(billing, row["tasks"], row["charge_fixed_price_usd"], cost)
        return line
    added, priced = repricing.usage.get(key, (Decimal(0), 0))
    line["cost_usd"] = row["cost_usd"] + added
    line["unpriced_requests"] = row["unpriced_requests"] - priced
    line["billed_usd"] = Decimal(0) if row["kind"] == "task_usage" else line["cost_usd"]
    return line


def _merged(previous: dict[str, Any], line: dict[str, Any]) -> bool:
    """Add `line` to `previous` if it is the same line (tasks of another billing)."""
    same = all(previous[k] == line[k] for k in ("account_id", "kind", "model", "task_type"))
    if same:
        previous["tasks"] += line["tasks"]
        previous["billed_usd"] += line["billed_usd"]
    return same


async def export_monthly(
    engine: AsyncEngine, period: BillingPeriod, fmt: ReportFormat, account_id: uuid.UUID | None
) -> AsyncIterator[bytes]:
    """The report as chunks of bytes. Holds one database connection while it streams."""
    start, end = period.start, period.end
    renderer = CsvRenderer(str(period)) if fmt == "csv" else JsonRenderer(str(period))
    totals = Totals()
    yield renderer.header()
    async with engine.connect() as connection:
        await tune_for_aggregation(connection)
        repricing = await _repricing(connection, start, end, account_id)
        pending: dict[str, Any] | None = None
        async for rows in monthly_rows(connection, str(period), start, end, account_id, CHUNK_ROWS):
            ready = []
            for row in rows:
                line = _line_of(row, repricing)
                if pending is not None and _merged(pending, line):
                    continue
                if pending is not None:
                    ready.append(pending)
                pending = line
            for line in ready:
                totals.add(line)
            yield renderer.rows(ready)
        if pending is not None:
            totals.add(pending)
            yield renderer.rows([pending])
    yield renderer.footer(totals.as_dict())


async def unpriced_report(
    session: AsyncSession, period: BillingPeriod, account_id: uuid.UUID | None
) -> list[UnpricedReportRow]:
    """Ledger rows of `period` stored without a price, per account and model, with how many
    a price added since would now cover."""
    repository = UnpricedUsageRepository(session)
    rows = await repository.unpriced_rows(period.start, period.end, account_id)
    if not rows:
        return []
    # Read fresh, not from the in-process cache: a price added a moment ago by another
    # worker covers rows now, as it does in a draft.
    book = PriceBook(await PriceRepository(session).all_prices())
    segments = {model: book.segments(model) for model in sorted({r.model for r in rows})}
    priced_now: dict[tuple[uuid.UUID, str], int] = {}
    for r in await repository.unpriced_rows(period.start, period.end, account_id, segments):
        assert r.segment is not None
        if segments[r.model][r.segment].price is not None:
            key = (r.account_id, r.model)
            priced_now[key] = priced_now.get(key, 0) + r.totals.requests
    report = []
    for r in rows:
        covered = priced_now.get((r.account_id, r.model), 0)
        report.append(
            UnpricedReportRow(
                account_id=r.account_id,
                model=r.model,
                requests=r.totals.requests,
                prompt_tokens=r.totals.prompt_tokens,
                completion_tokens=r.totals.completion_tokens,
                first_occurred_at=r.first_occurred_at,
                last_occurred_at=r.last_occurred_at,
                requests_priced_now=covered,
                requests_without_price=r.totals.requests - covered,
            )
        )
    return report
