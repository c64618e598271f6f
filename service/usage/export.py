"""The raw usage export: every ledger row of a range as CSV, JSON Lines or Parquet, for
audits and data teams.

The columns are `GET /billing/usage/events`'s fields, in its order and with its values:
exact cost as a decimal string (Parquet: decimal128(24, 12), the ledger's NUMERIC), times
in RFC 3339 UTC. Rows arrive from a server-side cursor a batch at a time and leave as
soon as they are rendered, so a range of any size is exported in constant memory.

Parquet needs the `parquet` extra (pyarrow), which the base install leaves out.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
from sqlalchemy.ext.asyncio import AsyncEngine

from service.errors import NotInstalled, Unprocessable
from service.reports.service import CsvSheet, text_cell
from service.usage.repository import UsageFilter, event_batches
from service.usage.schemas import EVENT_FIELDS, ExportFormat

# Longest range one export covers: a year of partitions (366 days, a leap year's). Longer
# audits are cut into years, each a file a spreadsheet or a notebook can still open.
MAX_RANGE = timedelta(days=366)
# Rows fetched from the cursor per step: large enough that the per-step cost vanishes.
BATCH_ROWS = 5000
# Rows per Parquet row group: what readers scan and skip by; a few MB of Arrow memory.
ROW_GROUP_ROWS = 100_000

MEDIA_TYPES: dict[ExportFormat, str] = {
    "csv": "text/csv; charset=utf-8",
    "jsonl": "application/x-ndjson",
    "parquet": "application/vnd.apache.parquet",
}

Row = Any


def check_range(start: datetime, end: datetime) -> None:
    """A 422 naming the parameter: an empty range, or one longer than `MAX_RANGE`."""
    if end <= start:
        raise Unprocessable("query.end: must be after start", param="query.end")
    if end - start > MAX_RANGE:
        raise Unprocessable(
            f"query.end: at most {MAX_RANGE.days} days after start; export a longer"
            " range a year at a time",
            param="query.end",
        )


def check_format(fmt: ExportFormat) -> None:
    """Parquet without pyarrow is a 501 naming the extra, before the first byte."""
    if fmt != "parquet":
        return
    try:
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise NotInstalled(
            "format=parquet needs pyarrow, which this server lacks:"
            " pip install 'meterline[parquet]'",
            param="query.format",
        ) from None


def filename(where: UsageFilter, fmt: ExportFormat) -> str:
    def stamp(at: datetime | None) -> str:
        return "" if at is None else f"{at:%Y%m%dT%H%M%SZ}"

    suffix = f"-{where.account_id}" if where.account_id else ""
    return f"meterline-usage-{stamp(where.start)}-{stamp(where.end)}{suffix}.{fmt}"


def _time(at: datetime) -> str:
    # As the JSON API writes it: `Z` for UTC, microseconds only when there are any.
    return at.isoformat().replace("+00:00", "Z")


class CsvEvents(CsvSheet):
    """A header line, then one line per row; an empty cell for null."""

    def header(self) -> bytes:
        self.writer.writerow(EVENT_FIELDS)
        return self.take()

    def rows(self, rows: Iterable[Row]) -> bytes:
        # Text a client chose (ids, models, providers, error codes) through `text_cell`;
        # the rest is numbers, times, ids and the ledger's own enums. Unpacked by position,
        # in EVENT_FIELDS order: this is the per-row cost of a large export.
        self.writer.writerows(
            (
                text_cell(request_id),
                _time(occurred_at),
                _time(recorded_at),
                kind,
                account_id,
                key_id,
                text_cell(task_id),
                text_cell(task_type),
                endpoint,
                text_cell(model),
                text_cell(upstream_model),
                text_cell(provider),
                "true" if stream else "false",
                status_code,
                text_cell(error_code),
                prompt_tokens,
                completion_tokens,
                total_tokens,
                cached_tokens,
                reasoning_tokens,
                usage_source,
                latency_ms,
                ttft_ms,
                None if cost_usd is None else format(cost_usd, "f"),
                price_version_id,
            )
            for (
                request_id,
                occurred_at,
                recorded_at,
                kind,
                account_id,
                key_id,
                task_id,
                task_type,
                endpoint,
                model,
                upstream_model,
                provider,
                stream,
                status_code,
                error_code,
                prompt_tokens,
                completion_tokens,
                total_tokens,
                cached_tokens,
                reasoning_tokens,
                usage_source,
                latency_ms,
                ttft_ms,
                cost_usd,
                price_version_id,
            ) in rows
        )
        return self.take()

    def footer(self) -> bytes:
        return b""


def _json_default(value: object) -> str:
    if isinstance(value, Decimal):
        return format(value, "f")
    raise TypeError(f"{type(value).__name__} in a usage row")


class JsonlEvents:
    """One JSON object per line, as `GET /billing/usage/events` writes a row."""

    def header(self) -> bytes:
        return b""

    def rows(self, rows: Iterable[Row]) -> bytes:
        dumps, option = orjson.dumps, orjson.OPT_UTC_Z | orjson.OPT_APPEND_NEWLINE
        return b"".join(dumps(r._asdict(), default=_json_default, option=option) for r in rows)

    def footer(self) -> bytes:
        return b""


class _Chunks:
    """The file object pyarrow writes the Parquet file into, emptied after each row group."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0
        self.closed = False

    def write(self, data: bytes) -> int:
        self.parts.append(bytes(data))
        self.size += len(data)
        return len(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def take(self) -> bytes:
        chunk = b"".join(self.parts)
        self.parts.clear()
        return chunk


class ParquetEvents:
    """Row groups of `ROW_GROUP_ROWS`, each sent once written; the footer last."""

    def __init__(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.pa = pa
        text, time = pa.string(), pa.timestamp("us", tz="UTC")
        types = {
            "occurred_at": time,
            "recorded_at": time,
            "stream": pa.bool_(),
            "status_code": pa.int16(),
            "latency_ms": pa.int32(),
            "ttft_ms": pa.int32(),
            # The ledger's NUMERIC(24, 12): exact, never a float.
            "cost_usd": pa.decimal128(24, 12),
            "price_version_id": pa.int64(),
        }
        tokens = ("prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens")
        types |= dict.fromkeys((*tokens, "reasoning_tokens"), pa.int64())
        self.schema = pa.schema([(name, types.get(name, text)) for name in EVENT_FIELDS])
        self.sink = _Chunks()
        self.writer = pq.ParquetWriter(self.sink, self.schema, compression="zstd")
        self.pending: list[Any] = []
        self.pending_rows = 0

    def header(self) -> bytes:
        return b""

    def _batch(self, rows: Iterable[Row]) -> Any:
        columns: list[Any] = [list(c) for c in zip(*rows, strict=True)]
        if not columns:
            return None
        return self.pa.RecordBatch.from_arrays(
            [self.pa.array(c, type=f.type) for c, f in zip(columns, self.schema, strict=True)],
            schema=self.schema,
        )

    def _flush(self) -> bytes:
        if self.pending:
            self.writer.write_table(
                self.pa.Table.from_batches(self.pending, schema=self.schema),
                row_group_size=ROW_GROUP_ROWS,
            )
            self.pending, self.pending_rows = [], 0
        return self.sink.take()

    def rows(self, rows: Iterable[Row]) -> bytes:
        # Converted to Arrow at once (a tenth of the rows' size as Python objects), written
        # out a row group at a time.
        batch = self._batch(rows)
        if batch is not None:
            self.pending.append(batch)
            self.pending_rows += batch.num_rows
        return self._flush() if self.pending_rows >= ROW_GROUP_ROWS else b""

    def footer(self) -> bytes:
        chunk = self._flush()
        self.writer.close()
        return chunk + self.sink.take()


Renderer = CsvEvents | JsonlEvents | ParquetEvents


def _renderer(fmt: ExportFormat) -> Renderer:
    if fmt == "csv":
        return CsvEvents()
    if fmt == "jsonl":
        return JsonlEvents()
    return ParquetEvents()


async def export_events(
    engine: AsyncEngine, where: UsageFilter, fmt: ExportFormat
) -> AsyncIterator[bytes]:
    """The export as chunks of bytes. Holds one database connection while it streams."""
    renderer = _renderer(fmt)
    yield renderer.header()
    async with engine.connect() as connection:
        async for rows in event_batches(connection, where, BATCH_ROWS):
            chunk = renderer.rows(rows)
            if chunk:
                yield chunk
    yield renderer.footer()
