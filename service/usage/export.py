"""The raw usage export: every ledger row of a range as CSV, JSON Lines or Parquet, for
audits and data teams.

The columns are `GET /billing/usage/events`'s fields, in its order and with its values:
exact cost as a decimal string (Parquet: decimal128(24, 12), the ledger's NUMERIC), times
in RFC 3339 UTC. CSV and JSON Lines are rendered by Postgres (COPY) and passed through:
no row is decoded in Python, which would cost ten times more than the rest. Parquet's rows
arrive from a server-side cursor a batch at a time, converted to Arrow. Either way, chunks
leave as soon as they are made, so a range of any size is exported in constant memory.

Parquet needs the `parquet` extra (pyarrow), which the base install leaves out.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from service.errors import NotInstalled, Unprocessable
from service.usage.repository import UsageFilter, copy_events, event_batches
from service.usage.schemas import EVENT_FIELDS, ExportFormat

# Longest range one export covers: a year of partitions (366 days, a leap year's). Longer
# audits are cut into years, each a file a spreadsheet or a notebook can still open.
MAX_RANGE = timedelta(days=366)
# Parquet's rows fetched from the cursor per step: large enough that the per-step cost
# vanishes.
BATCH_ROWS = 5000
# COPY output is sent in chunks of this size (or the last, smaller), and this many chunks
# wait for the client at most: a few MB whatever the range.
CHUNK_BYTES = 256 * 1024
QUEUED_CHUNKS = 8
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


class CrlfRows:
    """Postgres ends a CSV row with LF; the exports end rows in CRLF (RFC 4180), as the
    monthly report does. A LF ends a row where it stands outside quotes (after an even
    number of `"`: a quote inside a cell is doubled), and is part of a cell otherwise: only
    the former become CRLF. The count carries over from one chunk to the next."""

    def __init__(self) -> None:
        self.quoted = False

    def __call__(self, chunk: bytes) -> bytes:
        if b'"' not in chunk:
            return chunk if self.quoted else chunk.replace(b"\n", b"\r\n")
        parts = chunk.split(b'"')
        # parts[i] is outside quotes for even i, when the chunk begins outside.
        first = 1 if self.quoted else 0
        parts[first::2] = [p.replace(b"\n", b"\r\n") for p in parts[first::2]]
        self.quoted ^= len(parts) % 2 == 0
        return b'"'.join(parts)


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


async def _parquet(engine: AsyncEngine, where: UsageFilter) -> AsyncIterator[bytes]:
    renderer = ParquetEvents()
    async with engine.connect() as connection:
        async for rows in event_batches(connection, where, BATCH_ROWS):
            chunk = renderer.rows(rows)
            if chunk:
                yield chunk
    yield renderer.footer()


async def _copied(
    engine: AsyncEngine, where: UsageFilter, fmt: ExportFormat
) -> AsyncIterator[bytes]:
    """The bytes Postgres renders (`copy_events`), passed on as they come. COPY runs in a
    task that hands each chunk over through a short queue: when the client reads slowly,
    the queue fills, the task waits, asyncpg stops reading and Postgres waits in turn, so
    memory holds a few chunks whatever the range. A client that goes away cancels the task,
    and with it the query."""
    chunks: asyncio.Queue[bytes | Exception | None] = asyncio.Queue(maxsize=QUEUED_CHUNKS)
    pending = bytearray()

    async def handed_over(data: bytes) -> None:
        # asyncpg hands over what one read brought, often a few kB (Postgres sends rows as
        # its 8 kB buffer fills): gathered into chunks of `CHUNK_BYTES`, so the per-chunk
        # cost of the response (middleware, framing, a write) is paid a few hundred times
        # per 100 MB rather than tens of thousands.
        pending.extend(data)
        if len(pending) >= CHUNK_BYTES:
            await chunks.put(bytes(pending))
            pending.clear()

    async def copy() -> None:
        try:
            async with engine.connect() as connection:
                await copy_events(connection, where, fmt, handed_over)
            if pending:
                await chunks.put(bytes(pending))
        except Exception as error:
            # To the reader, which raises it (a cancelled copy puts nothing: no one reads).
            await chunks.put(error)
        else:
            await chunks.put(None)

    to_crlf = CrlfRows() if fmt == "csv" else None
    task = asyncio.create_task(copy())
    try:
        while (chunk := await chunks.get()) is not None:
            if isinstance(chunk, Exception):
                raise chunk
            yield chunk if to_crlf is None else to_crlf(chunk)
    finally:
        if not task.done():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def export_events(
    engine: AsyncEngine, where: UsageFilter, fmt: ExportFormat
) -> AsyncIterator[bytes]:
    """The export as chunks of bytes. Holds one database connection while it streams."""
    return _parquet(engine, where) if fmt == "parquet" else _copied(engine, where, fmt)
