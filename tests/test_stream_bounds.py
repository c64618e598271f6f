"""What one request may cost a worker: a stream's line and duration, a client's slow body.

A server with tight bounds (a 64 KiB line, a 1 s stream, a 1 s body) shows each cut: the
client is told in OpenAI's shape, and a stream cut is one ledger row saying why.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.conftest import Meterline, Upstream, start_meterline
from tests.support import Database

MODEL = "meta-llama/Llama-3.3-70B-Instruct"
HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def server(
    database_url: str, upstream: Upstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Meterline]:
    with start_meterline(
        database_url,
        upstream,
        Path(tmp_path_factory.mktemp("bounds")),
        METERLINE_STREAM_MAX_LINE_BYTES=str(64 * 1024),
        # Short enough to cut the mock's 3 s stream, long enough that on a loaded machine the
        # endless line reaches its bound first.
        METERLINE_STREAM_MAX_DURATION_S="2",
        METERLINE_CLIENT_BODY_TIMEOUT_S="1",
    ) as server:
        yield server


@pytest.fixture(scope="module")
def key(server: Meterline) -> str:
    return server.customer()[1]


def _row(db: Database, request_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while not (rows := db.fetch("SELECT * FROM usage_ledger WHERE request_id = $1", request_id)):
        assert time.monotonic() < deadline, f"no ledger row for {request_id}"
        time.sleep(0.05)
    assert len(rows) == 1
    return rows[0]


def test_a_line_that_never_ends_is_cut_at_the_bound(
    server: Meterline, key: str, db: Database
) -> None:
    body = {"model": MODEL, "messages": HELLO, "stream": True, "mock": {"endless_line": True}}
    with httpx.stream(
        "POST",
        f"{server.v1}/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json=body,
        timeout=30,
    ) as response:
        request_id = response.headers["x-request-id"]
        raw = b"".join(response.iter_bytes())
    # The provider would have sent 64 MiB; the client got the bound and an error event of
    # its own (after a blank line, so the SSE framing holds).
    assert len(raw) < 256 * 1024
    assert raw.endswith(b"\n\n")
    last = raw.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
    assert last.startswith(b'data: {"error"') and b"upstream_line_too_long" in last
    row = _row(db, request_id)
    assert (row["status_code"], row["error_code"]) == (502, "upstream_line_too_long")
    assert row["prompt_tokens"] > 0


def test_a_stream_past_its_longest_duration_is_cut_and_bills_what_was_sent(
    server: Meterline, key: str, db: Database
) -> None:
    client = openai.OpenAI(base_url=server.v1, api_key=key, max_retries=0)
    words = []
    with client.chat.completions.with_streaming_response.create(
        model=MODEL,
        messages=HELLO,
        stream=True,
        extra_body={"mock": {"chunks": 12, "chunk_delay_ms": 250}},
    ) as response:
        request_id = response.headers["x-request-id"]
        with pytest.raises(openai.APIError, match="longest a stream may last"):
            for chunk in response.parse():
                if chunk.choices and chunk.choices[0].delta.content:
                    words.append(chunk.choices[0].delta.content)
    assert 0 < len(words) < 12
    row = _row(db, request_id)
    assert (row["status_code"], row["error_code"]) == (502, "stream_too_long")
    assert row["completion_tokens"] == len(words)  # one token per word in the mock


def test_a_healthy_stream_within_the_bounds_is_not_cut(server: Meterline, key: str) -> None:
    client = openai.OpenAI(base_url=server.v1, api_key=key, max_retries=0)
    stream = client.chat.completions.create(
        model=MODEL, messages=HELLO, stream=True, extra_body={"mock": {"chunks": 8}}
    )
    words = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    assert len(words) == 8


def test_a_body_that_stalls_gets_a_408_and_the_worker_moves_on(server: Meterline, key: str) -> None:
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\n"
            + f"Host: {host}\r\nAuthorization: Bearer {key}\r\n".encode()
            + b"Content-Type: application/json\r\nContent-Length: 400\r\n\r\n"
            + b'{"model": "'  # and then nothing more
        )
        started = time.monotonic()
        answer = sock.recv(65536)
        waited = time.monotonic() - started
        while b"}}" not in answer and (more := sock.recv(65536)):  # the body may come apart
            answer += more
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 408"), answer
    assert b'"code":"request_timeout"' in rest.replace(b" ", b"")
    assert 0.8 < waited < 5
    # The server still serves.
    assert httpx.get(f"{server.url}/healthz").status_code == 200


def test_a_body_sent_slowly_but_within_the_bound_is_served(server: Meterline, key: str) -> None:
    def pieces() -> Iterator[bytes]:
        body = f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "Hi"}}]}}'
        for i in range(0, len(body), 16):
            yield body[i : i + 16].encode()
            time.sleep(0.02)

    response = httpx.post(
        f"{server.v1}/chat/completions",
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        content=pieces(),
        timeout=30,
    )
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"]
