"""What every command prints: tables and records for people, JSON for scripts, one-line
errors on stderr; and the options both families share (`--json`, `--period`)."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any, NoReturn

import typer
from rich import box
from rich.cells import cell_len
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table

from pricing.invoice import BillingPeriod

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]

err = Console(stderr=True)


def print_error(message: str) -> None:
    """An error on stderr, for a command that goes on (it still exits non-zero at the end)."""
    # One line whatever the terminal width, and the message printed as it is (not markup).
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)


def fail(message: str, code: int = 1) -> NoReturn:
    print_error(message)
    raise typer.Exit(code)


def parse_period(text: str) -> BillingPeriod:
    """`--period YYYY-MM`, read as the API reads a period; a bad month stops the command
    before it sends or changes anything."""
    try:
        return BillingPeriod.parse(text)
    except ValueError as exc:
        fail(f"--period: {exc}")


PeriodOption = Annotated[
    BillingPeriod,
    typer.Option(parser=parse_period, metavar="YYYY-MM", help="The month, YYYY-MM (UTC)."),
]


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2) + "\n")


def human(column: str, value: Any) -> str:
    """A cell for people: times to the second, money without its trailing zeros.

    Only the tables: `--json` keeps the API's exact values.
    """
    if value is None:
        return ""
    text = str(value)
    if column.endswith("_at") and len(text) >= 19 and text[10] == "T":
        return text[:19].replace("T", " ") + "Z"
    if column.endswith("_usd") and "." in text:
        whole, _, fraction = text.partition(".")
        return f"{whole}.{fraction.rstrip('0').ljust(2, '0')}"
    return text


def _longest_word(text: str) -> int:
    return max((cell_len(word) for word in text.split()), default=0)


def _share(spare: int, wants: list[int]) -> list[int]:
    """`spare` cells split in proportion to `wants`, never more than each wants."""
    total = sum(wants)
    given = [min(want, spare * want // total) if total else 0 for want in wants]
    for index in sorted(range(len(wants)), key=lambda i: wants[i] - given[i], reverse=True):
        if sum(given) >= spare:
            break
        given[index] += min(wants[index] - given[index], spare - sum(given))
    return given


def _fit(table: Table, cells: list[list[str]], console: Console) -> bool:
    """Narrow `table`'s columns to the console, breaking cells only between words.

    False when even one word a column per line is too wide: rich would then cut ids and
    amounts in the middle, which nobody can read or copy.
    """
    natural = [max(cell_len(c) for c in column) for column in cells]
    shortest = [
        width if col.no_wrap else max(_longest_word(c) for c in column)
        for width, col, column in zip(natural, table.columns, cells, strict=True)
    ]
    wide = console.options.update_width(10**6)
    overhead = Measurement.get(console, wide, table).maximum - sum(natural)
    room = console.width - overhead
    if sum(natural) <= room:
        return True
    if sum(shortest) > room:
        return False
    wants = [n - s for n, s in zip(natural, shortest, strict=True)]
    extra = _share(room - sum(shortest), wants)
    for column, width, more in zip(table.columns, shortest, extra, strict=True):
        column.width = width + more
    return True


def print_table(rows: list[dict[str, Any]], columns: list[str], title: str | None = None) -> None:
    """Rows as a table as wide as the terminal; one record per row when it cannot fit."""
    console = Console()
    # Columns two spaces apart, a rule under the header, no frame: more room for values.
    table = Table(
        title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True
    )
    for column in columns:
        numeric = column.endswith(("_usd", "tokens", "requests", "_rpm", "_tpm"))
        # Ids are copied from the screen: never wrap them.
        whole = column == "id" or column.endswith("_id")
        table.add_column(
            # Spaces let a header wrap: `monthly_budget_usd` alone would widen its column.
            column.replace("_", " "),
            justify="right" if numeric else "left",
            overflow="fold",
            no_wrap=whole,
        )
    body = [[human(c, row.get(c)) for c in columns] for row in rows]
    for cells in body:
        table.add_row(*cells)
    headers = [[column.replace("_", " ")] for column in columns]
    cells_by_column = [[*header, *(cells[i] for cells in body)] for i, header in enumerate(headers)]
    if _fit(table, cells_by_column, console):
        console.print(table)
        return
    if title:
        console.print(title, highlight=False)
    for index, row in enumerate(rows):
        if index:
            console.print()
        print_record(row, columns)


def print_result(
    value: dict[str, Any] | list[dict[str, Any]],
    as_json: bool,
    columns: list[str] | None = None,
    title: str | None = None,
) -> None:
    """What a command answers: JSON for scripts; for people a list as a table, an object as
    a record (`columns`: its fields, by default all)."""
    if as_json:
        print_json(value)
    elif isinstance(value, list):
        assert columns is not None, "a table needs its columns"
        print_table(value, columns, title)
    else:
        print_record(value, columns)


def print_record(record: dict[str, Any], fields: list[str] | None = None) -> None:
    """One object as `field  value` lines: readable however many fields it has."""
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for name in fields or list(record):
        table.add_row(name, human(name, record.get(name)))
    Console().print(table)
