"""Logs as an operator reads them: one key=value line per event, each value quoted when it
would not read as one, and the billing API's request id on its lines and its responses."""

from __future__ import annotations

import ast
import logging
import re
import secrets
import time
import uuid
from decimal import Decimal
from pathlib import Path

import httpx
import openai

from service.logs import REQUEST_ID, KeyValueFormatter, log_value
from tests.conftest import ADMIN_TOKEN, Meterline
from tests.support import ROOT

NEW_ID = re.compile(r"req_[0-9a-f]{32}")


def test_values_are_quoted_when_they_would_not_read_as_one_value() -> None:
    assert log_value("mock-chat_1.2:3/v1") == "mock-chat_1.2:3/v1"
    assert log_value("café") == "café"
    assert log_value("no route to host") == '"no route to host"'
    assert log_value('say "hi"') == '"say \\"hi\\""'
    assert log_value("a=b") == '"a=b"'
    assert log_value("back\\slash") == '"back\\\\slash"'
    assert log_value("") == '""'
    assert log_value("a\nb\tc\x00d\u2028") == '"a\\nb\\tc\\u0000d\\u2028"'
    key = uuid.uuid4()
    assert log_value(key) == str(key)
    assert log_value(OSError("disk full")) == '"disk full"'
    # Numbers stay numbers, so `%d` and `%.3f` still format them.
    assert log_value(3) == 3 and log_value(1.5) == 1.5
    assert log_value(Decimal("0.000012")) == Decimal("0.000012")


def test_a_line_holds_its_values_quoted_and_the_request_id_of_its_request() -> None:
    formatter = KeyValueFormatter()
    args = ("no route to host", 3, 0.25)
    record = logging.LogRecord(
        "meterline.test",
        logging.WARNING,
        __file__,
        1,
        "event=x error=%s rows=%d s=%.3f",
        args,
        None,
    )
    line = formatter.format(record)
    assert re.fullmatch(
        r"ts=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z level=WARNING logger=meterline\.test"
        r' event=x error="no route to host" rows=3 s=0\.250',
        line,
    ), line
    assert record.args == args  # the record itself is left as it was logged
    token = REQUEST_ID.set("req_0123")
    try:
        assert formatter.format(record) == f"{line} request_id=req_0123"
    finally:
        REQUEST_ID.reset(token)


_LEVELS = {"debug", "info", "warning", "error", "exception", "critical"}
# `event=name` first, then `key=value` pairs whose values are arguments or plain words.
_TOKEN = re.compile(r"[a-z_]+=(%s|%d|%\.\d+f|[A-Za-z0-9_./:-]+)")


def test_every_log_call_writes_key_value_pairs_with_its_values_as_arguments() -> None:
    """A value written into the format string itself would escape the quoting."""
    calls = 0
    for path in sorted((ROOT / "service").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in _LEVELS
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "log"
            ):
                continue
            calls += 1
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            message = node.args[0] if node.args else None
            assert isinstance(message, ast.Constant) and isinstance(message.value, str), where
            tokens = message.value.split(" ")
            assert tokens[0].startswith("event="), where
            assert all(_TOKEN.fullmatch(token) for token in tokens), f"{where}: {message.value}"
    assert calls > 30  # it reads the tree (46 calls once the background loops became one Periodic)


def _line(log: Path, *needles: str) -> str:
    deadline = time.monotonic() + 10
    while True:
        lines = [x for x in log.read_text().splitlines() if all(n in x for n in needles)]
        if lines:
            return lines[-1]
        assert time.monotonic() < deadline, f"no log line with {needles}"
        time.sleep(0.1)


def test_billing_responses_and_their_log_lines_carry_the_request_id(meterline: Meterline) -> None:
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with httpx.Client(base_url=meterline.url, headers=admin, timeout=30) as client:
        # The client's own id is kept, and ends the lines logged while answering it.
        given = f"client-{secrets.token_hex(6)}"
        created = client.post(
            "/billing/accounts", json={"name": "logs"}, headers={"X-Request-Id": given}
        )
        assert created.status_code == 201 and created.headers["x-request-id"] == given
        line = _line(meterline.log, "event=account_created", created.json()["id"])
        assert line.endswith(f" request_id={given}") and "logger=meterline.accounts" in line
        # Otherwise (or when it could not be logged as is) a new one per response.
        made = client.post(
            "/billing/accounts", json={"name": "logs"}, headers={"X-Request-Id": "two words"}
        )
        request_id = made.headers["x-request-id"]
        assert NEW_ID.fullmatch(request_id)
        line = _line(meterline.log, "event=account_created", made.json()["id"])
        assert line.endswith(f" request_id={request_id}")

        answers = {
            "listed": client.get("/billing/accounts"),
            "no credential": client.get("/billing/usage", headers={"Authorization": ""}),
            "invalid parameter": client.get("/billing/usage", params={"group_by": "colour"}),
            "missing object": client.get(f"/billing/invoices/{uuid.uuid4()}"),
            "no such path": client.get("/billing/nowhere"),
            "body past the limit": client.post("/billing/accounts", content=b" " * (8 * 2**20 + 1)),
            "streamed export": client.get("/billing/reports/monthly", params={"period": "2026-01"}),
            "schema": client.get("/openapi.json"),
            "health": client.get("/healthz"),
            "console": client.get("/console/sign-in"),
        }
    ids = {name: answer.headers.get_list("x-request-id") for name, answer in answers.items()}
    assert all(len(found) == 1 and NEW_ID.fullmatch(found[0]) for found in ids.values()), ids
    assert len({found[0] for found in ids.values()}) == len(ids)
    assert answers["body past the limit"].status_code == 413

    # The proxy's responses keep their one id: the ledger row's.
    _, key = meterline.customer()
    proxy = openai.OpenAI(base_url=meterline.v1, api_key=key, max_retries=0)
    reply = proxy.chat.completions.with_raw_response.create(
        model="mock-chat", messages=[{"role": "user", "content": "hi"}]
    )
    assert len(reply.headers.get_list("x-request-id")) == 1
    assert NEW_ID.fullmatch(reply.headers["x-request-id"])
