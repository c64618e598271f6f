"""The raw usage export: every ledger row of a range, in CSV, JSON Lines and Parquet, adds
up to `GET /billing/usage` for the same range and caller; scoped like every route."""

from __future__ import annotations

import asyncio
import csv
import io
import itertools
import random
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pyarrow.parquet as pq
import pytest
from sqlalchemy import literal_column
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import create_async_engine
from typer.testing import CliRunner, Result

from service.cli import app as cli_app
from service.db.engine import sqlalchemy_url
from service.reports.repository import text_cell_sql
from service.reports.service import text_cell
from service.usage.export import CrlfRows, export_events
from service.usage.repository import UsageFilter, _copy_query
from tests.conftest import ADMIN_TOKEN, Meterline, Upstream, start_meterline
from tests.support import Database
from tests.usage_rows import insert_usage, usage_row

# A month no other test writes to, so the admin's all-accounts export is this file's rows.
RANGE = {"start": "2023-05-01T00:00:00Z", "end": "2023-06-01T00:00:00Z"}
BEGIN = datetime(2023, 5, 1, tzinfo=UTC)
# More rows than one cursor batch (5,000), so the export spans several.
BULK_ROWS = 12_000
FORMATS = ("csv", "jsonl", "parquet")
FORMULA = '=HYPERLINK("http://evil.example","x")'
# Text every format must carry through unchanged: a comma, quotes, line breaks of each
# kind, a tab, backslashes (which COPY's text format would double, and JSON escapes), a
# literal backslash-n, and letters outside ASCII.
ODD_TEXT = {
    "task_id": 'back\\slash, "quoted"\nline',
    "task_type": "tab\tcr\rcrlf\r\nend\\",
    "model": 'ünï, "cödé" \\n €',
    "provider": "\\",
}


@pytest.fixture(scope="module")
def may(meterline: Meterline, db: Database) -> dict[str, Any]:
    """Two accounts with usage in May 2023 (one with many rows), plus rows just outside."""
    small_id, small_key = meterline.customer(name="export-small")
    bulk_id, bulk_key = meterline.customer(name="export-bulk")
    row = usage_row
    insert_usage(
        db,
        # The range's first instant is in it, its end is not.
        row(small_id, BEGIN, prompt=100, completion=50, cost="0.000150000000", cached=40),
        row(small_id, BEGIN + timedelta(days=3), prompt=7, completion=3, cost=None),
        row(
            small_id,
            BEGIN + timedelta(days=9, microseconds=5),
            prompt=1000,
            completion=1,
            cost="0.001000400000",
            task_id=FORMULA,
            task_type='a,b "quoted"\r\nnext',
            model="m-2",
            reasoning=9,
        ),
        row(small_id, datetime(2023, 6, 1, tzinfo=UTC), prompt=999, cost="9"),
        row(small_id, BEGIN - timedelta(microseconds=1), prompt=999, cost="9"),
    )
    insert_usage(
        db,
        *(
            row(
                bulk_id,
                BEGIN + timedelta(seconds=200 * i),
                prompt=i % 997,
                completion=i % 13,
                # Exact to the twelfth place: a float sum would drift.
                cost=None if i % 50 == 0 else Decimal(i) * Decimal("0.000000123457"),
                model=f"m-{i % 3}",
            )
            for i in range(BULK_ROWS)
        ),
    )
    odd_id, odd_key = meterline.customer(name="export-odd")
    insert_usage(
        db,
        row(
            odd_id,
            BEGIN + timedelta(days=20, microseconds=500_000),
            cost="1.000000000001",
            task_id=ODD_TEXT["task_id"],
            task_type=ODD_TEXT["task_type"],
            model=ODD_TEXT["model"],
            provider=ODD_TEXT["provider"],
        ),
    )
    return {
        "small": (str(small_id), small_key),
        "bulk": (str(bulk_id), bulk_key),
        "odd": (str(odd_id), odd_key),
    }


def _export(client: httpx.Client, fmt: str, **params: Any) -> httpx.Response:
    return client.get("/billing/usage/events/export", params={**RANGE, "format": fmt, **params})


def _rows(fmt: str, body: bytes) -> list[dict[str, Any]]:
    """The export parsed back, every value as the JSON API would write it (or None)."""
    if fmt == "csv":
        reader = csv.DictReader(io.StringIO(body.decode(), newline=""))
        return [{k: (v if v != "" else None) for k, v in r.items()} for r in reader]
    if fmt == "jsonl":
        assert body.endswith(b"\n")
        return [orjson.loads(line) for line in body.splitlines()]
    parquet: list[dict[str, Any]] = pq.read_table(io.BytesIO(body)).to_pylist()
    return parquet


def _totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """`GET /billing/usage`'s totals, summed from exported rows."""
    token_fields = (
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "cached_tokens",
        "reasoning_tokens",
    )
    totals: dict[str, Any] = {"requests": len(rows)}
    for field in token_fields:
        totals[field] = sum(int(r[field]) for r in rows)
    costs = [r["cost_usd"] for r in rows]
    for cost in costs:
        # Exact in every format: a decimal string, or Parquet's decimal128 — never a float.
        assert cost is None or isinstance(cost, (str, Decimal)), type(cost)
    totals["cost_usd"] = sum((Decimal(c) for c in costs if c is not None), Decimal(0))
    totals["unpriced_requests"] = sum(1 for c in costs if c is None)
    return totals


def _usage(client: httpx.Client, **params: Any) -> dict[str, Any]:
    response = client.get("/billing/usage", params={**RANGE, **params})
    assert response.status_code == 200, response.text
    [total] = response.json()["data"]
    return {**total, "cost_usd": Decimal(total["cost_usd"])}


@pytest.fixture
def admin(meterline: Meterline) -> Iterator[httpx.Client]:
    with meterline.admin() as client:
        yield client


def _customer(meterline: Meterline, key: str) -> httpx.Client:
    return httpx.Client(
        base_url=meterline.url, headers={"Authorization": f"Bearer {key}"}, timeout=30
    )


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_admins_export_adds_up_to_the_usage_report(
    admin: httpx.Client, may: dict[str, Any], fmt: str
) -> None:
    response = _export(admin, fmt)
    assert response.status_code == 200, response.text
    rows = _rows(fmt, response.content)
    assert len(rows) == BULK_ROWS + 4
    assert _totals(rows) == _usage(admin)
    # Oldest first, as the paged rows are.
    times = [r["occurred_at"] for r in rows]
    parsed = [t if isinstance(t, datetime) else datetime.fromisoformat(t) for t in times]
    assert parsed == sorted(parsed)
    assert parsed[0] == BEGIN


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_customer_key_exports_its_own_account_only(
    meterline: Meterline, may: dict[str, Any], fmt: str
) -> None:
    small_id, small_key = may["small"]
    bulk_id, _ = may["bulk"]
    with _customer(meterline, small_key) as client:
        response = _export(client, fmt)
        assert response.status_code == 200, response.text
        rows = _rows(fmt, response.content)
        assert {r["account_id"] for r in rows} == {small_id}
        assert _totals(rows) == _usage(client)
        assert len(rows) == 3
        # Another account, named outright, is not there for this key.
        refused = _export(client, fmt, account_id=bulk_id)
        assert refused.status_code == 404, refused.text
        assert refused.json()["error"]["code"] == "not_found"


def test_the_admin_narrows_to_one_account(admin: httpx.Client, may: dict[str, Any]) -> None:
    bulk_id, _ = may["bulk"]
    response = _export(admin, "jsonl", account_id=bulk_id)
    assert response.status_code == 200
    rows = _rows("jsonl", response.content)
    assert len(rows) == BULK_ROWS
    assert _totals(rows) == _usage(admin, account_id=bulk_id)
    disposition = response.headers["content-disposition"]
    assert disposition == (
        f'attachment; filename="meterline-usage-20230501T000000Z-20230601T000000Z-{bulk_id}.jsonl"'
    )


def test_rows_are_those_of_the_events_api(admin: httpx.Client, may: dict[str, Any]) -> None:
    small_id, _ = may["small"]
    paged = admin.get(
        "/billing/usage/events", params={**RANGE, "account_id": small_id, "limit": 10}
    ).json()["data"]
    assert len(paged) == 3
    for fmt in ("csv", "jsonl"):
        rows = _rows(fmt, _export(admin, fmt, account_id=small_id).content)
        assert list(rows[0]) == list(paged[0])
        for exported, event in zip(rows, paged, strict=True):
            expected = {k: (None if v is None else v) for k, v in event.items()}
            if fmt == "csv":
                # CSV has text only; the spreadsheet-safe prefix is the one change.
                expected = {k: _csv_cell(v) for k, v in expected.items()}
            assert exported == expected
    parquet = _rows("parquet", _export(admin, "parquet", account_id=small_id).content)
    assert [r["request_id"] for r in parquet] == [e["request_id"] for e in paged]
    assert parquet[2]["cost_usd"] == Decimal("0.001000400000")
    assert parquet[2]["occurred_at"] == BEGIN + timedelta(days=9, microseconds=5)


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_any_text_round_trips_byte_for_byte(
    admin: httpx.Client, may: dict[str, Any], fmt: str
) -> None:
    odd_id, _ = may["odd"]
    [event] = admin.get("/billing/usage/events", params={**RANGE, "account_id": odd_id}).json()[
        "data"
    ]
    body = _export(admin, fmt, account_id=odd_id).content
    [row] = _rows(fmt, body)
    assert row == {k: _csv_cell(v) if fmt == "csv" else v for k, v in event.items()}
    for field, value in ODD_TEXT.items():
        assert row[field] == value
    # A fraction of a second keeps its six digits, as the events API writes it.
    assert row["occurred_at"] == event["occurred_at"] == "2023-05-21T00:00:00.500000Z"
    assert row["cost_usd"] == "1.000000000001"
    if fmt == "csv":
        # One header line and one row, each ending in CRLF; the cells' own line breaks
        # (quoted) are as stored: the LF of `task_id`, the CR and CRLF of `task_type`.
        assert body.endswith(b"\r\n") and body.count(b"\n") == 2 + 2
        assert body.count(b"\r\n") == 2 + 1
    else:
        assert body.count(b"\n") == 1


def _csv_cell(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    return "'" + text if text.startswith("=") else text


def test_csv_cells_a_spreadsheet_would_run_are_defused(
    admin: httpx.Client, may: dict[str, Any]
) -> None:
    small_id, _ = may["small"]
    body = _export(admin, "csv", account_id=small_id).content
    assert b"\r\n" in body and body.count(b"\r\n") >= 4
    rows = _rows("csv", body)
    assert rows[2]["task_id"] == "'" + FORMULA
    # A comma, quotes and a line break stay inside their cell.
    assert rows[2]["task_type"] == 'a,b "quoted"\r\nnext'
    assert rows[2]["cost_usd"] == "0.001000400000"
    assert rows[2]["occurred_at"] == "2023-05-10T00:00:00.000005Z"


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"end": RANGE["start"]}, "query.end"),
        ({"start": "2023-06-01T00:00:00Z"}, "query.end"),
        ({"start": "2022-05-01T00:00:00Z"}, "query.end"),
        ({"format": "xlsx"}, "query.format"),
        ({"start": "yesterday"}, "query.start"),
    ],
)
def test_bad_parameters_are_422s_naming_them(
    admin: httpx.Client, params: dict[str, str], param: str
) -> None:
    response = admin.get("/billing/usage/events/export", params={**RANGE, **params})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == param


def test_start_and_end_are_required(admin: httpx.Client) -> None:
    response = admin.get("/billing/usage/events/export", params={"start": RANGE["start"]})
    assert response.status_code == 422
    assert response.json()["error"]["param"] == "query.end"


def test_a_year_is_the_longest_range(admin: httpx.Client) -> None:
    leap = {"start": "2024-01-01T00:00:00Z", "end": "2025-01-01T00:00:00Z"}
    response = admin.get("/billing/usage/events/export", params=leap)
    assert response.status_code == 200
    assert response.content.startswith(b"request_id,occurred_at,")


def test_parquet_without_pyarrow_names_the_extra(
    database_url: str, upstream: Upstream, tmp_path: Path
) -> None:
    # A server whose `import pyarrow` fails, as on the base install.
    shadow = tmp_path / "shadow" / "pyarrow"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('no pyarrow here')\n")
    with (
        start_meterline(
            database_url, upstream, tmp_path / "server", PYTHONPATH=str(shadow.parent)
        ) as server,
        server.admin() as client,
    ):
        response = _export(client, "parquet")
        assert response.status_code == 501, response.text
        error = response.json()["error"]
        assert error["code"] == "extra_not_installed"
        assert error["param"] == "query.format"
        assert "meterline[parquet]" in error["message"]
        # The other formats need nothing more.
        assert _export(client, "jsonl").status_code == 200


def test_an_unknown_key_filter_is_a_404(admin: httpx.Client) -> None:
    response = _export(admin, "csv", key_id=str(uuid.uuid4()))
    assert response.status_code == 404
    assert response.json()["error"]["param"] == "query.key_id"


def _cli(meterline: Meterline, *args: str, token: str = ADMIN_TOKEN) -> Result:
    """`meterline usage export …`, run in this process against the real server."""
    return CliRunner().invoke(
        cli_app, ["usage", "export", *args, "--url", meterline.url, "--token", token]
    )


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_cli_writes_the_same_export_to_a_file(
    meterline: Meterline, admin: httpx.Client, may: dict[str, Any], fmt: str, tmp_path: Path
) -> None:
    out = tmp_path / f"may.{fmt}"
    args = ("--start", RANGE["start"], "--end", RANGE["end"], "--format", fmt, "-o", str(out))
    result = _cli(meterline, *args)
    assert result.exit_code == 0, result.output
    rows = _rows(fmt, out.read_bytes())
    assert _totals(rows) == _usage(admin)
    assert not (tmp_path / f"may.{fmt}.part").exists()
    assert f"wrote {out.stat().st_size:,} bytes to" in result.stderr


def test_the_cli_exports_what_a_customer_key_sees(
    meterline: Meterline, may: dict[str, Any], tmp_path: Path
) -> None:
    small_id, small_key = may["small"]
    out = tmp_path / "mine.jsonl"
    args = ("--start", RANGE["start"], "--end", RANGE["end"], "-f", "jsonl", "-o", str(out))
    result = _cli(meterline, *args, token=small_key)
    assert result.exit_code == 0, result.output
    assert {r["account_id"] for r in _rows("jsonl", out.read_bytes())} == {small_id}


def test_the_cli_names_a_bad_range_and_writes_nothing(meterline: Meterline, tmp_path: Path) -> None:
    out = tmp_path / "none.csv"
    args = ("--start", RANGE["end"], "--end", RANGE["start"], "-o", str(out))
    result = _cli(meterline, *args)
    assert result.exit_code == 1
    assert "must be after start (query.end) [HTTP 422]" in result.stderr
    assert list(tmp_path.iterdir()) == []


# A month of its own, and the times as the events API writes them: a fraction of each
# length Postgres would print (it drops trailing zeros), none at all, and a last instant
# that is already the next day east of UTC.
TIMES_MONTH = datetime(2023, 8, 1, tzinfo=UTC)
WRITTEN_TIMES = {
    TIMES_MONTH: "2023-08-01T00:00:00Z",
    TIMES_MONTH + timedelta(microseconds=1): "2023-08-01T00:00:00.000001Z",
    TIMES_MONTH + timedelta(microseconds=10): "2023-08-01T00:00:00.000010Z",
    TIMES_MONTH + timedelta(microseconds=100): "2023-08-01T00:00:00.000100Z",
    TIMES_MONTH + timedelta(microseconds=1_000): "2023-08-01T00:00:00.001000Z",
    TIMES_MONTH + timedelta(microseconds=10_000): "2023-08-01T00:00:00.010000Z",
    TIMES_MONTH + timedelta(seconds=1, microseconds=100_000): "2023-08-01T00:00:01.100000Z",
    TIMES_MONTH + timedelta(hours=13, microseconds=123_456): "2023-08-01T13:00:00.123456Z",
    datetime(2023, 8, 31, 23, 59, 59, 999_999, tzinfo=UTC): "2023-08-31T23:59:59.999999Z",
}


async def _exported_with_session(
    url: str, account_id: str, fmt: str, settings: dict[str, str]
) -> bytes:
    engine = create_async_engine(
        sqlalchemy_url(url), pool_size=1, connect_args={"server_settings": settings}
    )
    where = UsageFilter(
        account_id=uuid.UUID(account_id), start=TIMES_MONTH, end=datetime(2023, 9, 1, tzinfo=UTC)
    )
    try:
        return b"".join([chunk async for chunk in export_events(engine, where, fmt)])  # type: ignore[arg-type]
    finally:
        await engine.dispose()


@pytest.mark.parametrize(
    "settings",
    [{}, {"TimeZone": "Asia/Kathmandu", "DateStyle": "SQL, DMY", "IntervalStyle": "sql_standard"}],
)
def test_times_are_written_alike_whatever_the_sessions_time_zone(
    meterline: Meterline, db: Database, settings: dict[str, str]
) -> None:
    """Postgres renders the times: UTC with `Z`, six digits of microseconds or none, in any
    session TimeZone and DateStyle (Kathmandu is +05:45, so a zone's offset would show)."""
    account, _ = meterline.customer(name=f"export-times-{len(settings)}")
    account_id = str(account)
    rows = [
        usage_row(account_id, at, request_id=f"req_times_{len(settings)}_{n}")
        for n, at in enumerate(WRITTEN_TIMES)
    ]
    insert_usage(db, *rows)
    # A fixed recording time, so a whole line can be pinned.
    db.execute(
        "UPDATE usage_ledger SET recorded_at = occurred_at + interval '0.25 seconds'"
        " WHERE account_id = $1",
        uuid.UUID(account_id),
    )
    body = asyncio.run(_exported_with_session(db.url, account_id, "csv", settings))
    exported = list(csv.DictReader(io.StringIO(body.decode(), newline="")))
    assert [r["occurred_at"] for r in exported] == list(WRITTEN_TIMES.values())
    assert exported[2]["recorded_at"] == "2023-08-01T00:00:00.250010Z"
    assert exported[6]["recorded_at"] == "2023-08-01T00:00:01.350000Z"
    request_id = f"req_times_{len(settings)}_1"
    assert (
        body.split(b"\r\n")[2]
        == (
            f"{request_id},2023-08-01T00:00:00.000001Z,2023-08-01T00:00:00.250001Z,usage,"
            f"{account_id},,,,chat,mock-chat,mock-chat,mock,false,200,,10,5,15,0,0,upstream,,,"
            "0.000015000000,"
        ).encode()
    )
    body = asyncio.run(_exported_with_session(db.url, account_id, "jsonl", settings))
    lines = body.splitlines()
    assert [orjson.loads(line)["occurred_at"] for line in lines] == list(WRITTEN_TIMES.values())
    assert (
        lines[1]
        == (
            f'{{"request_id":"{request_id}","occurred_at":"2023-08-01T00:00:00.000001Z",'
            '"recorded_at":"2023-08-01T00:00:00.250001Z","kind":"usage",'
            f'"account_id":"{account_id}","key_id":null,"task_id":null,"task_type":null,'
            '"endpoint":"chat","model":"mock-chat","upstream_model":"mock-chat","provider":"mock",'
            '"stream":false,"status_code":200,"error_code":null,"prompt_tokens":10,'
            '"completion_tokens":5,"total_tokens":15,"cached_tokens":0,"reasoning_tokens":0,'
            '"usage_source":"upstream","latency_ms":null,"ttft_ms":null,'
            '"cost_usd":"0.000015000000","price_version_id":null}'
        ).encode()
    )


# Every string of up to three characters from those the rule looks at, and a few others.
RULE_ALPHABET = " \n\t\r=+-@'A1é"


def test_the_sql_escaping_rule_is_the_python_one(db: Database) -> None:
    """The raw export defuses formulas in SQL, the monthly report in Python: one rule."""
    values = [
        "".join(chars)
        for size in range(4)
        for chars in itertools.product(RULE_ALPHABET, repeat=size)
    ]
    cell = text_cell_sql(literal_column("v")).compile(
        dialect=postgresql.asyncpg.dialect(),  # type: ignore[no-untyped-call]
        compile_kwargs={"render_postcompile": True},
    )
    rows = db.fetch(f"SELECT v, {cell} AS cell FROM unnest($1::text[]) AS v", values)
    assert len(rows) == len(values) > 1000
    assert {r["v"]: r["cell"] for r in rows} == {v: text_cell(v) for v in values}
    assert db.fetchval(f"SELECT {cell} FROM (SELECT NULL::text AS v) AS t") is None
    assert text_cell(" \n=1") == "' \n=1" and text_cell("A=1") == "A=1"


def test_rows_end_in_crlf_however_the_chunks_fall() -> None:
    """Postgres ends rows in LF: those outside quotes become CRLF, a cell's own stay."""
    rows = [
        ["plain", "a,b", 'say "hi"\n', "", "x"],
        ["\n", '"', '""\n"', "cr\r", "crlf\r\n"],
        ["last", "\n\n", "", "", "end"],
    ]

    def written(terminator: str) -> bytes:
        out = io.StringIO()
        csv.writer(out, lineterminator=terminator, quoting=csv.QUOTE_ALL).writerows(rows)
        return out.getvalue().encode()

    lf, crlf = written("\n"), written("\r\n")
    rng = random.Random(7)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(lf)), rng.randint(0, 12)))
        chunks = [lf[a:b] for a, b in zip([0, *cuts], [*cuts, len(lf)], strict=True)]
        to_crlf = CrlfRows()
        assert b"".join(to_crlf(c) for c in chunks) == crlf


def _plan_nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", ()):
        yield from _plan_nodes(child)


def test_the_export_reads_the_ledger_in_its_order_without_sorting(
    db: Database, may: dict[str, Any]
) -> None:
    """A month is exported in (occurred_at, request_id) order read from an index: sorting
    it instead cost a third of the export's database time, spilled to disk. With sorting
    priced out, a plan without the index would still have to sort."""
    query = _copy_query(UsageFilter(start=BEGIN, end=BEGIN + timedelta(days=31)), "csv")
    sql = str(
        query.compile(
            dialect=postgresql.asyncpg.dialect(),  # type: ignore[no-untyped-call]
            compile_kwargs={"literal_binds": True, "render_postcompile": True},
        )
    )

    async def explained() -> Any:
        connection = await asyncpg.connect(db.dsn)
        try:
            await connection.execute("SET enable_sort = off")
            return await connection.fetchval(f"EXPLAIN (FORMAT JSON) {sql}")
        finally:
            await connection.close()

    [plan] = orjson.loads(asyncio.run(explained()))
    nodes = list(_plan_nodes(plan["Plan"]))
    assert not [n for n in nodes if "Sort" in n["Node Type"]]
    assert [n["Index Name"] for n in nodes if n["Node Type"] == "Index Scan"] == [
        "usage_ledger_p202305_occurred_at_request_id_idx"
    ]
