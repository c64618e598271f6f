"""The access log: one key=value line per proxied request (`METERLINE_ACCESS_LOG`).

    ts=… level=INFO logger=meterline.access event=request request_id=req_… account=…
    key_prefix=ml-AbCdEfGh endpoint=chat model=mock-chat stream=false status=200 error=-
    prompt_tokens=12 completion_tokens=16 total_tokens=28 cost_usd=0.000028 latency_ms=4

Never a secret: a key appears only as the prefix the billing API lists, and only once the
key is known (a refused credential is not written at all). A request only appends its
ledger record to a deque (well under a microsecond; `logging` would cost it 20 to 40 µs); a
thread of this process's own formats and writes the lines every 100 ms, so a stderr that
stalls (a full pipe) never holds the event loop either. A process killed with SIGKILL loses
at most its last 100 ms of lines; the ledger, not this log, is the record of usage.
"""

from __future__ import annotations

import collections
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass

import orjson

from service.ledger.record import LedgerRecord

# Below PIPE_BUF, so the writes of several workers sharing one stderr pipe never interleave
# within a line.
_CHUNK_BYTES = 4096
_PLAIN = re.compile(r'[^\s"=\\]+')


def _value(text: str | None) -> str:
    """`-` for nothing; quoted (JSON) when a space, quote or `=` would break the line."""
    if text is None:
        return "-"
    return text if _PLAIN.fullmatch(text) else orjson.dumps(text).decode()


@dataclass(frozen=True, slots=True)
class _Refusal:
    request_id: str
    endpoint: str
    status: int
    code: str | None
    latency_ms: int
    account_id: uuid.UUID | None
    model: str | None


class AccessLog:
    def __init__(self, fd: int = 2, interval_s: float = 0.1, max_lines: int = 100_000) -> None:
        self._fd = fd
        self._interval_s = interval_s
        self._max_lines = max_lines
        self._pending: collections.deque[tuple[float, LedgerRecord | _Refusal, str]] = (
            collections.deque()
        )
        self._dropped = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._write_forever, name="access-log", daemon=True)
        # Formatting caches of the writer thread: a handful of accounts and models recur.
        self._names: dict[object, str] = {}
        self._second = -1
        self._second_text = ""

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Write what is left and stop the thread."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self._write_pending()

    # -- the hot path: remember the request ---------------------------------------------------

    def request(self, record: LedgerRecord, key_prefix: str) -> None:
        """A forwarded request, from its ledger record (status, tokens, cost, latency)."""
        self._add(record, key_prefix)

    def refused(
        self,
        request_id: str,
        endpoint: str,
        status: int,
        code: str | None,
        started: float,
        account_id: uuid.UUID | None = None,
        key_prefix: str | None = None,
        model: str | None = None,
    ) -> None:
        """A request answered by Meterline itself (401, 404, 429, …): nothing was forwarded."""
        latency_ms = int((time.perf_counter() - started) * 1000)
        refusal = _Refusal(request_id, endpoint, status, code, latency_ms, account_id, model)
        self._add(refusal, key_prefix or "-")

    def _add(self, entry: LedgerRecord | _Refusal, key_prefix: str) -> None:
        if len(self._pending) >= self._max_lines:  # the writer is stuck: drop, count, say so
            self._dropped += 1
            return
        self._pending.append((time.time(), entry, key_prefix))

    # -- the writer thread: format and write ---------------------------------------------------

    def _name(self, value: object) -> str:
        """An account id or a model as written in the line, remembered (bounded)."""
        try:
            return self._names[value]
        except KeyError:
            text = "-" if value is None else _value(str(value))
            if len(self._names) < 10_000:
                self._names[value] = text
            return text

    def _asctime(self, t: float) -> str:
        # The same clock and layout as `logging`'s asctime: every line of the log reads alike.
        second = int(t)
        if second != self._second:
            self._second = second
            self._second_text = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))
        return f"{self._second_text},{int(t % 1 * 1000):03d}"

    def _line(self, t: float, entry: LedgerRecord | _Refusal, key_prefix: str) -> bytes:
        head = f"ts={self._asctime(t)} level=INFO logger=meterline.access event=request"
        if isinstance(entry, _Refusal):
            return (
                f"{head} request_id={entry.request_id} account={self._name(entry.account_id)} "
                f"key_prefix={key_prefix} endpoint={entry.endpoint} "
                f"model={self._name(entry.model)} status={entry.status} "
                f"error={_value(entry.code)} latency_ms={entry.latency_ms}\n"
            ).encode()
        cost = "-" if entry.cost_usd is None else format(entry.cost_usd, "f")
        ttft = "-" if entry.ttft_ms is None else str(entry.ttft_ms)
        return (
            f"{head} request_id={entry.request_id} account={self._name(entry.account_id)} "
            f"key_prefix={key_prefix} endpoint={entry.endpoint} "
            f"model={self._name(entry.requested_model)} task={_value(entry.task_id)} "
            f"stream={'true' if entry.stream else 'false'} status={entry.status_code} "
            f"error={_value(entry.error_code)} prompt_tokens={entry.prompt_tokens} "
            f"completion_tokens={entry.completion_tokens} total_tokens={entry.total_tokens} "
            f"usage={entry.usage_source} cost_usd={cost} latency_ms={entry.latency_ms} "
            f"ttft_ms={ttft}\n"
        ).encode()

    def _write_forever(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._write_pending()

    def _write_pending(self) -> None:
        chunk: list[bytes] = []
        size = 0
        while self._pending:
            data = self._line(*self._pending.popleft())
            if size + len(data) > _CHUNK_BYTES and chunk:
                self._write(b"".join(chunk))
                chunk, size = [], 0
            chunk.append(data)
            size += len(data)
        if self._dropped:
            dropped, self._dropped = self._dropped, 0
            chunk.append(
                f"ts={self._asctime(time.time())} level=WARNING logger=meterline.access "
                f"event=access_log_dropped lines={dropped}\n".encode()
            )
        if chunk:
            self._write(b"".join(chunk))

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError:
            pass  # stderr closed or broken: an access line is not worth failing over
