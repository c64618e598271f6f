"""Reading usage out of an OpenAI-style server-sent-event stream, as it passes through.

Two ways through:

- Pass-through (the client sees the provider's bytes as they come): each received piece
  is forwarded at once and only kept; the events are split and read once the stream is
  over (or cut), or once 64 kB are kept, so the per-chunk cost is one list append.
- Hiding injected usage (Meterline asked for `include_usage` on the client's behalf):
  complete events are forwarded as they complete, without the `"usage": null` field the
  provider then adds to each chunk and without the final usage-only chunk, so the client
  gets exactly the stream it would have got without the injection.

Either way, what a stream holds is bounded by its text, not its length in chunks: past
64 kB of kept events, they are read (their output text, usage and model kept) and dropped.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from service.tokens import estimate

_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_NULL_USAGE_TAIL = b',"usage":null}'
_DONE = b"[DONE]"
# A stream holds at most this many bytes of events it has not read; past it, they are read
# and dropped (`StreamMeter._digest`). A long generation then holds its text, a few bytes a
# token, rather than every chunk, a few hundred bytes each.
_KEEP_BYTES = 64 * 1024
# A stream's model is read from its first events: this many at most.
_MODEL_LOOKUPS = 3


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
        self._raw: list[bytes] = []  # pass-through: what was received and not digested yet
        self._tail = b""
        self._payloads: list[bytes] = []  # hiding: payloads read as they complete
        self._usage: dict[str, Any] | None = None
        self._kept = 0  # bytes held in `_raw` or `_payloads`
        self._digest_at = _KEEP_BYTES
        # What the digested events told (`_digest`): their output text, the last usage among
        # them, the model (read from the first events), and how many first events are left
        # to look for it in.
        self._text: list[str] = []
        self._digested_usage: dict[str, Any] | None = None
        self._model: str | None = None
        self._model_lookups = _MODEL_LOOKUPS

    @property
    def held(self) -> int:
        """Bytes of an incomplete event held back (hiding injected usage only)."""
        return len(self._tail)

    def feed(self, chunk: bytes) -> bytes:
        """Take a piece of the upstream body; return the bytes to send the client now."""
        if not self.hide_usage:
            self._raw.append(chunk)
            self._kept += len(chunk)
            if self._kept > self._digest_at:
                self._digest()
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
                self._keep(stripped)
                return b"data: " + stripped + b"\n\n"
            if b'"usage"' not in data:
                if data != _DONE:
                    self._keep(data)
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
                self._keep(data)
            return event + b"\n\n"
        if data.endswith(_NULL_USAGE_TAIL):  # the common case needs no JSON parsing
            stripped = data[: -len(_NULL_USAGE_TAIL)] + b"}"
            self._keep(stripped)
            return b"data: " + stripped + b"\n\n"
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            self._keep(data)
            return event + b"\n\n"
        if not isinstance(obj, dict) or "usage" not in obj:
            self._keep(data)
            return event + b"\n\n"
        usage = obj.pop("usage")
        if isinstance(usage, dict):
            self._usage = usage
        if not obj.get("choices"):
            return None  # the usage-only chunk the client did not ask for
        stripped = orjson.dumps(obj)
        self._keep(stripped)
        return b"data: " + stripped + b"\n\n"

    def flush(self) -> bytes:
        """What is left to send once the upstream body ended (an unterminated last event)."""
        if not self.hide_usage or not self._tail:
            return b""
        tail, self._tail = self._tail, b""
        kept = self._hide(tail)
        return kept or b""

    def _keep(self, payload: bytes) -> None:
        self._payloads.append(payload)
        self._kept += len(payload)
        if self._kept > self._digest_at:
            self._digest()

    def _undigested(self, final: bool = True) -> list[bytes]:
        """Data payloads of the complete events not digested yet; `final`: the stream is
        over, so an unterminated last event counts too."""
        if not self.hide_usage and self._raw:
            raw = b"".join(self._raw)
            events, rest = split_events(raw)
            if final and rest.strip():
                events.append(rest)
                rest = b""
            self._payloads += [d for d in map(_data_of, events) if d is not None and d != _DONE]
            self._raw = [rest] if rest else []
        return self._payloads

    def _digest(self) -> None:
        """Read the events held so far and drop them, keeping what `usage`, `model` and
        `completion_text` need of them: a stream holds its text, not every chunk."""
        payloads = self._undigested(final=False)
        self._find_model(payloads)
        usage = _last_usage(payloads)
        if usage is not None:
            self._digested_usage = usage
        self._text.append(estimate.completion_text(payloads))
        self._payloads = []
        # What is left is an event still incomplete; should it be long (a line up to
        # `stream_max_line_bytes`), the next digest waits for it to double, so a long line
        # is joined a few times, not once per piece.
        self._kept = sum(map(len, self._raw))
        self._digest_at = self._kept + max(_KEEP_BYTES, self._kept)

    def _find_model(self, payloads: list[bytes]) -> None:
        for data in payloads[: self._model_lookups]:
            self._model_lookups -= 1
            try:
                obj = orjson.loads(data)
            except orjson.JSONDecodeError:
                continue
            if isinstance(obj, dict) and isinstance(obj.get("model"), str):
                self._model, self._model_lookups = obj["model"], 0
                return

    def usage(self) -> dict[str, Any] | None:
        """The provider's usage: the last one reported wins (running totals grow)."""
        if self._usage is not None:
            return self._usage
        usage = _last_usage(self._undigested())
        return usage if usage is not None else self._digested_usage

    def model(self) -> str | None:
        """The model the provider named in the stream's first events."""
        self._find_model(self._undigested())
        return self._model

    def completion_text(self) -> str:
        """The text the stream generated (what the tokenizer counts when no usage came)."""
        return "".join(self._text) + estimate.completion_text(self._undigested())


def _last_usage(payloads: list[bytes]) -> dict[str, Any] | None:
    for data in reversed(payloads):
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
