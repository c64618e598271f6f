"""The billing API as the command line speaks to it: over HTTP, like any other client.

`meterline accounts|keys|usage|report` talk to a running Meterline (`--url`, default
`http://METERLINE_HOST:METERLINE_PORT`) with the admin token (`--token`, default
`METERLINE_ADMIN_TOKEN`) or a customer key, so they work from any machine and obey the
same rules as the API.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any, NoReturn

import httpx
import typer
from rich.console import Console
from rich.table import Table

from pricing.invoice import BillingPeriod
from service.settings import get_settings

UrlOption = Annotated[
    str | None,
    typer.Option(
        "--url",
        envvar="METERLINE_URL",
        help="Meterline's base URL [default: http://METERLINE_HOST:METERLINE_PORT].",
        show_default=False,
    ),
]
TokenOption = Annotated[
    str | None,
    typer.Option(
        "--token",
        envvar="METERLINE_TOKEN",
        help="Admin token or customer key [default: METERLINE_ADMIN_TOKEN].",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]

err = Console(stderr=True)


def fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[red]error:[/red] {message}", highlight=False)
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


class BillingClient:
    def __init__(self, url: str | None, token: str | None) -> None:
        settings = get_settings()
        if token is None and settings.admin_token is not None:
            token = settings.admin_token.get_secret_value()
        if not token:
            fail("no credential: pass --token or set METERLINE_TOKEN / METERLINE_ADMIN_TOKEN", 2)
        self.http = httpx.Client(
            base_url=url or f"http://{settings.host}:{settings.port}",
            headers={"Authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(30.0, read=600.0),
        )

    def __enter__(self) -> BillingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    def _check(self, response: httpx.Response) -> None:
        if response.is_success:
            return
        response.read()
        try:
            error = response.json()["error"]
            param = f" ({error['param']})" if error.get("param") else ""
            message = f"{error['message']}{param} [HTTP {response.status_code}]"
        except (ValueError, KeyError, TypeError):
            message = f"HTTP {response.status_code}: {response.text[:200]}"
        fail(message)

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            fail(f"cannot reach {self.http.base_url}: {exc}", 2)
        self._check(response)
        return response.json()

    def pages(self, path: str, params: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
        """Every item of a paginated list, following `next_cursor`."""
        params = dict(params or {})
        while True:
            page = self.request("GET", path, params=params)
            yield from page["data"]
            if not page.get("next_cursor"):
                return
            params["cursor"] = page["next_cursor"]

    @contextmanager
    def stream(self, path: str, params: dict[str, Any]) -> Iterator[httpx.Response]:
        try:
            with self.http.stream("GET", path, params=params) as response:
                self._check(response)
                yield response
        except httpx.TransportError as exc:
            fail(f"cannot reach {self.http.base_url} or the export was cut: {exc}", 2)


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


def print_table(rows: list[dict[str, Any]], columns: list[str], title: str | None = None) -> None:
    table = Table(title=title)
    for column in columns:
        numeric = column.endswith(("_usd", "tokens", "requests", "_rpm", "_tpm"))
        # Ids are copied from the screen: never wrap them.
        whole = column == "id" or column.endswith("_id")
        table.add_column(
            column, justify="right" if numeric else "left", overflow="fold", no_wrap=whole
        )
    for row in rows:
        table.add_row(*(human(c, row.get(c)) for c in columns))
    Console().print(table)


def print_record(record: dict[str, Any], fields: list[str] | None = None) -> None:
    """One object as `field  value` lines: readable however many fields it has."""
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for name in fields or list(record):
        table.add_row(name, human(name, record.get(name)))
    Console().print(table)
