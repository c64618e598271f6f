"""Reading a stream's usage as it passes: however the provider's bytes are cut into pieces,
the client gets the same stream and the meter reads the same usage.

The meter takes a piece that is exactly one whole event without splitting it (the usual
piece, read at a fraction of the cost); any other piece goes through the event splitter.
Both ways must agree, which is what these properties check."""

from __future__ import annotations

import itertools
import re

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from service.proxy.sse import StreamMeter, split_events


def _content(text: str, injected_null: bool) -> bytes:
    chunk: dict[str, object] = {
        "id": "c1",
        "object": "chat.completion.chunk",
        "model": "m",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
    }
    if injected_null:
        chunk["usage"] = None
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


_USAGE = b'data: {"id":"c1","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\n'
_DONE = b"data: [DONE]\n\n"

# What providers also send: comments, named events, data split over lines, CRLF line ends.
_OTHER = (
    b": keep-alive\n\n",
    b'event: message\ndata: {"id":"c1","choices":[]}\n\n',
    b'data: {"id":"c1",\ndata: "choices":[]}\n\n',
    b'data: {"id":"c1","choices":[{"delta":{"content":"crlf"}}]}\r\n\r\n',
)
events = st.lists(
    st.one_of(
        st.tuples(st.text(max_size=12), st.booleans()).map(lambda pair: _content(*pair)),
        st.sampled_from(_OTHER),
    ),
    min_size=1,
    max_size=8,
)


def _fed(meter: StreamMeter, pieces: list[bytes]) -> bytes:
    out = b"".join(meter.feed(piece) for piece in pieces)
    return out + meter.flush()


def _cut(raw: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(raw) + 1) for cut in cuts} | {0, len(raw)})
    return [raw[a:b] for a, b in itertools.pairwise(points) if b > a]


@settings(max_examples=200, deadline=None)
@given(events, st.booleans(), st.booleans(), st.lists(st.integers(min_value=0), max_size=6))
def test_the_same_stream_is_passed_on_and_metered_however_it_is_cut(
    chunks: list[bytes], with_usage: bool, hide_usage: bool, cuts: list[int]
) -> None:
    stream = chunks + ([_USAGE] if with_usage else []) + [_DONE]
    raw = b"".join(stream)
    whole, by_event, by_cut = (StreamMeter(hide_usage) for _ in range(3))
    sent = _fed(whole, [raw])
    assert _fed(by_event, stream) == sent
    assert _fed(by_cut, _cut(raw, cuts)) == sent
    for meter in (by_event, by_cut):
        assert meter.payloads() == whole.payloads()
        assert meter.usage() == whole.usage()
        assert meter.model() == whole.model()
    if hide_usage:  # the client sees neither the injected nulls nor the usage-only chunk
        assert b'"usage"' not in sent
        assert sent.endswith(_DONE)
    else:
        assert sent == raw
    assert (whole.usage() is not None) == with_usage


@given(
    st.lists(st.sampled_from([b"data: x", b"\n", b"\r", b"\n\n", b"\r\n\r\n", b":"]), max_size=12)
)
def test_events_end_at_every_blank_line_the_grammar_allows(parts: list[bytes]) -> None:
    raw = b"".join(parts)
    *events, rest = re.split(rb"\r\n\r\n|\n\n|\r\r", raw)
    assert split_events(raw) == (events, rest)
