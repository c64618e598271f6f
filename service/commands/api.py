"""The API-client commands: the billing API as the command line speaks to it, over HTTP,
like any other client.

`meterline accounts|keys|usage|report|tasks|quote`, and `prices export` and `invoices
finalize|void|show|unpriced`, talk to a running Meterline (`--url`, default
`http://METERLINE_HOST:METERLINE_PORT`) with the admin token (`--token`, default
`METERLINE_ADMIN_TOKEN`) or a customer key, so they work from any machine and obey the
same rules as the API.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, BinaryIO

import httpx
import typer
from rich.progress import (
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)

from service.commands.output import err, fail
from service.settings import get_settings

# The heading of these commands in `meterline --help` (and in a group mixing both families).
API_CLIENTS = "Billing API clients (a running Meterline at --url, with --token)"

UrlOption = Annotated[
    str | None,
    typer.Option(
        "--url",
        envvar="METERLINE_URL",
        help="Meterline's base URL.",
        show_default="http://METERLINE_HOST:METERLINE_PORT",
    ),
]
TokenOption = Annotated[
    str | None,
    typer.Option(
        "--token",
        envvar="METERLINE_TOKEN",
        help="Admin token or customer key.",
        show_default="METERLINE_ADMIN_TOKEN",
    ),
]

# Tasks and quotes belong to one account: a customer key names it, the admin must.
AccountOption = Annotated[
    str | None,
    typer.Option("--account-id", help="The account; required with the admin token."),
]


class ApiError(Exception):
    """The API refused a request; the message is the one line a person reads."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


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
        raise ApiError(message)

    def attempt(self, method: str, path: str, **kwargs: Any) -> Any:
        """The answer's JSON; a refusal raises `ApiError`, for a command that goes on with
        the next item (a server out of reach still ends the command)."""
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            fail(f"cannot reach {self.http.base_url}: {exc}", 2)
        self._check(response)
        return response.json()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """The answer's JSON; a refusal is printed in one line and exits 1."""
        try:
            return self.attempt(method, path, **kwargs)
        except ApiError as exc:
            fail(exc.message)

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
        except ApiError as exc:
            fail(exc.message)
        except httpx.TransportError as exc:
            fail(f"cannot reach {self.http.base_url} or the export was cut: {exc}", 2)


def download(
    client: BillingClient,
    path: str,
    params: dict[str, Any],
    output: Path | None,
    label: str,
    complete: Callable[[bytes], bool],
    rows: Callable[[int], int],
) -> int:
    """An export streamed to `output` (default stdout), with progress on a terminal; returns
    its rows, `rows` of its line count. `complete` judges the export's last bytes: a file
    appears only once complete, so a cut export never passes for a whole one."""
    partial = output.with_name(output.name + ".part") if output else None
    try:
        sink: BinaryIO = partial.open("wb") if partial else sys.stdout.buffer
    except OSError as exc:
        fail(f"cannot write {output}: {exc.strerror or exc}")
    lines = 0
    tail = b""
    progress = Progress(
        SpinnerColumn(),
        TextColumn("exporting {task.fields[label]}: {task.fields[rows]} rows"),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    )
    whole = False
    try:
        with progress:
            task = progress.add_task("export", total=None, label=label, rows=0)
            with client.stream(path, params) as response:
                for chunk in response.iter_bytes():
                    sink.write(chunk)
                    lines += chunk.count(b"\n")
                    tail = (tail + chunk)[-4096:]
                    progress.update(task, advance=len(chunk), rows=rows(lines))
        whole = complete(tail)
    finally:
        if partial:
            sink.close()
            if whole and output:
                os.replace(partial, output)
            else:
                partial.unlink(missing_ok=True)
    if not whole:
        fail("the export ended early (server error or connection cut); nothing written")
    return rows(lines)
