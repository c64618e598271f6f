"""What a worker carries from start-up: the libraries only some requests need are loaded by
the first of them, not at start (each worker of `meterline serve` pays for what it loads).

fpdf2, which draws invoice PDFs, brings Pillow and fontTools (21 MB a worker); aiohttp,
which posts webhooks, 9.5 MB; Redis's client, which only a server with `METERLINE_REDIS_URL`
uses, 5.8 MB. Whether a library is loaded is read from the worker's memory map
(`/proc/PID/maps`: the compiled modules of Pillow and aiohttp) or, for the pure-Python Redis
client, from the imports the worker's interpreter logs (`PYTHONPROFILEIMPORTTIME`), so the
test watches the real server, not an import in the test's own interpreter.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import openai
import psutil
import pytest

from tests.conftest import Meterline, Upstream, _clone, _with_database, start_meterline
from tests.reliability import redis_available, redis_namespace

PDF_LIBRARY = "/PIL/_imaging"  # Pillow's compiled core: fpdf2 imports Pillow
WEBHOOK_LIBRARY = "/aiohttp/_http_parser"


# A line of `-X importtime` naming the package itself ("import time: 283 | 36375 |   redis").
REDIS_IMPORTED = re.compile(r"^import time:.*\|\s+redis$", re.M)


def mapped(pid: int, library: str) -> bool:
    return library in Path(f"/proc/{pid}/maps").read_text()


def one_request(server: Meterline) -> dict[str, object]:
    """A chat completion through `server` with a new account's key; the account."""
    account = server.new_account()
    client = openai.OpenAI(base_url=server.v1, api_key=server.new_key(account["id"]))
    client.chat.completions.create(
        model="meta-llama/Llama-3.3-70B-Instruct",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=4,
    )
    return account


def rss_mb(pid: int) -> float:
    return float(psutil.Process(pid).memory_info().rss) / 2**20


@pytest.fixture
def server(
    postgres_server: str, template_database: str, upstream: Upstream, tmp_path: Path
) -> Iterator[Meterline]:
    admin, name = _clone(postgres_server, template_database)
    try:
        with start_meterline(
            _with_database(postgres_server, name),
            upstream,
            tmp_path,
            METERLINE_WEBHOOKS_ALLOW_PRIVATE="1",
        ) as meterline:
            yield meterline
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def hooks() -> Iterator[tuple[str, list[bytes]]]:
    received: list[bytes] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.append(self.rfile.read(int(self.headers.get("content-length", "0"))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            return None

    listener = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=listener.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.server_address[1]}/hooks", received
    finally:
        listener.shutdown()
        listener.server_close()


def test_pdf_and_webhook_libraries_load_with_their_first_use_not_at_start(
    server: Meterline, hooks: tuple[str, list[bytes]]
) -> None:
    hook_url, received = hooks
    account = one_request(server)
    started = rss_mb(server.pid)
    assert not mapped(server.pid, PDF_LIBRARY)
    assert not mapped(server.pid, WEBHOOK_LIBRARY)

    last_month = (datetime.now(UTC).replace(day=1) - timedelta(days=1)).strftime("%Y-%m")
    with server.admin() as api:
        subscribed = api.post(
            "/billing/webhooks", json={"url": hook_url, "events": ["invoice.finalized"]}
        )
        assert subscribed.status_code == 201, subscribed.text
        invoice = api.post(
            "/billing/invoices", json={"account_id": account["id"], "period": last_month}
        )
        assert invoice.status_code == 201, invoice.text
        drawn = api.get(f"/billing/invoices/{invoice.json()['id']}/pdf")
        assert drawn.status_code == 200 and drawn.content.startswith(b"%PDF")
        assert mapped(server.pid, PDF_LIBRARY)
        assert not mapped(server.pid, WEBHOOK_LIBRARY)

        finalized = api.post(f"/billing/invoices/{invoice.json()['id']}/finalize")
        assert finalized.status_code == 200, finalized.text
    deadline = time.monotonic() + 20
    while not received and time.monotonic() < deadline:
        time.sleep(0.05)
    assert received and b"invoice.finalized" in received[0]
    assert mapped(server.pid, WEBHOOK_LIBRARY)
    print(f"\nworker RSS: {started:.0f} MB after start and a request, {rss_mb(server.pid):.0f} MB")


@pytest.mark.skipif(not redis_available(), reason="no Redis at 127.0.0.1:6379")
def test_the_redis_client_loads_only_in_a_server_that_uses_redis(
    database_url: str, upstream: Upstream, tmp_path: Path
) -> None:
    def imports_redis(workdir: Path, **env: str) -> bool:
        with start_meterline(
            database_url, upstream, workdir, PYTHONPROFILEIMPORTTIME="1", **env
        ) as meterline:
            one_request(meterline)
            return bool(REDIS_IMPORTED.search(meterline.log.read_text()))

    assert not imports_redis(tmp_path / "alone")
    with redis_namespace() as shared:
        assert imports_redis(tmp_path / "shared", **shared)
