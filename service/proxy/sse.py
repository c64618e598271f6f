"""Reading usage out of an OpenAI-style server-sent-event stream, as it passes through.

Two ways through:

- Pass-through (the client sees the provider's bytes as they come): each received piece
  is forwarded at once and only kept; the events are split and read once the stream is
  over (or cut), so the per-chunk cost is one list append.
- Hiding injected usage (Meterline asked for `include_usage` on the client's behalf):
  complete events are forwarded as they complete, without the `"usage": null` field the
  provider then adds to each chunk and without the final usage-only chunk, so the client
  gets exactly the stream it would have got without the injection.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_NULL_USAGE_TAIL = b',"usage":null}'
_DONE = b"[DONE]"


def _data_of(event: bytes) -> bytes | None:
    """The data payload of one event (its `data:` lines joined), or None."""
    if event.startswith(b"data: ") and b"\n" not in event and b"\r" not in event:
        return event[6:]  # the usual event: one `data:` line
    lines = [line for line in event.splitlines() if line.startswith(b"data:")]
    if not lines:
        return None
    payloads = [line[6:] if line[5:6] == b" " else line[5:] for line in lines]
    return b"\n".join(payloads)


def split_events(raw: bytes) -> tuple[list[bytes], bytes]:
    """Complete events (without their blank-line terminator) and the incomplete rest."""
    if b"\r" not in raw:  # the usual stream, split at C speed
        *events, rest = raw.split(b"\n\n")
        return events, rest
    events = []
    start = 0
    for match in _EVENT_END.finditer(raw):
        events.append(raw[start : match.start()])
        start = match.end()
    return events, raw[start:]


class StreamMeter:
    def __init__(self, hide_usage: bool) -> None:
        self.hide_usage = hide_usage
        self._raw: list[bytes] = []  # pass-through: everything received, read at the end
        self._tail = b""
        self._payloads: list[bytes] = []  # hiding: payloads read as they complete
        self._usage: dict[str, Any] | None = None

    @property
    def held(self) -> int:
        """Bytes of an incomplete event held back (hiding injected usage only)."""
        return len(self._tail)

    def feed(self, chunk: bytes) -> bytes:
        """Take a piece of the upstream body; return the bytes to send the client now."""
        if not self.hide_usage:
            self._raw.append(chunk)
            return chunk
        if (
            not self._tail
            and chunk.startswith(b"data: ")
            and chunk.endswith(b"\n\n")
            and chunk.count(b"\n") == 2
        ):
            # The usual piece: exactly one whole event, read without splitting it. With the
            # injected `"usage": null` it is stripped; without any usage it goes as it came.
            data = chunk[6:-2]
            if data.endswith(_NULL_USAGE_TAIL):
                stripped = data[: -len(_NULL_USAGE_TAIL)] + b"}"
                self._payloads.append(stripped)
                return b"data: " + stripped + b"\n\n"
            if b'"usage"' not in data:
                if data != _DONE:
                    self._payloads.append(data)
                return chunk
        events, self._tail = split_events(self._tail + chunk)
        out = []
        for event in events:
            kept = self._hide(event)
            if kept is not None:
                out.append(kept)
        return b"".join(out)

    def _hide(self, event: bytes) -> bytes | None:
        data = _data_of(event)
        if data is None or data == _DONE or b'"usage"' not in data:
            if data is not None and data != _DONE:
                self._payloads.append(data)
            return event + b"\n\n"
        if data.endswith(_NULL_USAGE_TAIL):  # the common case needs no JSON parsing
            stripped = data[: -len(_NULL_USAGE_TAIL)] + b"}"
            self._payloads.append(stripped)
            return b"data: " + stripped + b"\n\n"
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            self._payloads.append(data)
            return event + b"\n\n"
        if not isinstance(obj, dict) or "usage" not in obj:
            self._payloads.append(data)
            return event + b"\n\n"
        usage = obj.pop("usage")
        if isinstance(usage, dict):
            self._usage = usage
        if not obj.get("choices"):
            return None  # the usage-only chunk the client did not ask for
        stripped = orjson.dumps(obj)
        self._payloads.append(stripped)
        return b"data: " + stripped + b"\n\n"

    def flush(self) -> bytes:
        """What is left to send once the upstream body ended (an unterminated last event)."""
        if not self.hide_usage or not self._tail:
            return b""
        tail, self._tail = self._tail, b""
        kept = self._hide(tail)
        return kept or b""

    def payloads(self) -> list[bytes]:
        """Data payloads of all complete events seen (including a final unterminated one)."""
        if not self.hide_usage:
            raw = b"".join(self._raw)
            events, rest = split_events(raw)
            if rest.strip():
                events.append(rest)
            self._payloads = [d for d in map(_data_of, events) if d is not None and d != _DONE]
            self._raw = [raw]
        return self._payloads

    def usage(self) -> dict[str, Any] | None:
        """The provider's usage: the last one reported wins (running totals grow)."""
        if self._usage is not None:
            return self._usage
        for data in reversed(self.payloads()):
            if b'"usage"' not in data:
                continue
            try:
                obj = orjson.loads(data)
            except orjson.JSONDecodeError:
                continue
            if isinstance(obj, dict) and isinstance(obj.get("usage"), dict):
                usage: dict[str, Any] = obj["usage"]
                return usage
        return None

    def model(self) -> str | None:
        for data in self.payloads()[:3]:
            try:
                obj = orjson.loads(data)
            except orjson.JSONDecodeError:
                continue
            if isinstance(obj, dict) and isinstance(obj.get("model"), str):
                model: str = obj["model"]
                return model
        return None


# Fields of a streamed choice's delta that carry generated output.
_OUTPUT_FIELDS = ("content", "reasoning_content", "reasoning", "refusal")


def _has_output(choice: Any) -> bool:
    if not isinstance(choice, dict):
        return False
    if isinstance(choice.get("text"), str) and choice["text"]:
        return True
    delta = choice.get("delta")
    if not isinstance(delta, dict):
        return False
    if any(isinstance(delta.get(f), str) and delta[f] for f in _OUTPUT_FIELDS):
        return True
    for call in delta.get("tool_calls") or []:
        fn = call.get("function") if isinstance(call, dict) else None
        if isinstance(fn, dict) and (fn.get("arguments") or fn.get("name")):
            return True
    return False


class OutputCounter:
    """Counts what a stream generates as it passes, to cut one that runs past its allowance.

    A provider that honours `max_tokens` sends at most one chunk per token it generates (a
    token of its own tokenizer, whatever that is), so the running count is the choices
    carrying output, chunk by chunk, or the provider's running `completion_tokens` when it
    reports one: a stream within its limit is never cut, and one whose provider ignores
    the limit is cut at the first chunk past its allowance.
    """

    def __init__(self, allowance: int) -> None:
        self.allowance = allowance
        self.generated = 0
        self._tail = b""

    def feed(self, chunk: bytes) -> int | None:
        """None while within the allowance; else how many bytes of `chunk` to pass on (up to
        the chunk past the allowance, or through it when part of it was passed on already)."""
        if (
            not self._tail
            and chunk.startswith(b"data: ")
            and chunk.endswith(b"\n\n")
            and chunk.count(b"\n") == 2
        ):  # the usual piece: exactly one whole event
            return 0 if self._count(chunk[6:-2]) else None
        raw = self._tail + chunk
        passed = len(self._tail)  # bytes of `raw` the client already has
        start = 0
        for match in _EVENT_END.finditer(raw):
            if self._count(_data_of(raw[start : match.start()])):
                return start - passed if start >= passed else match.end() - passed
            start = match.end()
        self._tail = raw[start:]
        return None

    def _count(self, data: bytes | None) -> bool:
        """Count the output of one event's data; True once past the allowance."""
        if data is None or data == _DONE:
            return False
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            return False
        if not isinstance(obj, dict):
            return False
        choices = obj.get("choices")
        if isinstance(choices, list):
            self.generated += sum(1 for choice in choices if _has_output(choice))
        usage = obj.get("usage")
        if isinstance(usage, dict):
            reported = usage.get("completion_tokens")
            if isinstance(reported, int) and not isinstance(reported, bool):
                self.generated = max(self.generated, reported)
        return self.generated > self.allowance
