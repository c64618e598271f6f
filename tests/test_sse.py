"""Reading a stream's usage as it passes: however the provider's bytes are cut into pieces,
the client gets the same stream and the meter reads the same usage.

The meter takes a piece that is exactly one whole event without splitting it (the usual
piece, read at a fraction of the cost); any other piece goes through the event splitter.
Both ways must agree, which is what these properties check."""

from __future__ import annotations

import itertools
import re
import tracemalloc

import orjson
import pytest
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
        assert meter.completion_text() == whole.completion_text()
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


def _long_stream(tokens: int, usage_every: int = 0) -> tuple[list[bytes], str, dict[str, int]]:
    """A generation of `tokens` chunks (a running usage every `usage_every` of them, when
    set), then the final usage: its events, its text, its final usage."""
    events, text = [], []
    for i in range(tokens):
        word = f" w{i}"
        text.append(word)
        chunk = orjson.loads(_content(word, injected_null=False)[6:-2])
        if usage_every and i % usage_every == 0:
            chunk["usage"] = {"prompt_tokens": 3, "completion_tokens": i + 1}
        events.append(b"data: " + orjson.dumps(chunk) + b"\n\n")
    final = {"prompt_tokens": 3, "completion_tokens": tokens}
    events.append(b'data: {"id":"c1","choices":[],"usage":' + orjson.dumps(final) + b"}\n\n")
    return [*events, _DONE], "".join(text), final


@settings(max_examples=20, deadline=None)
@given(
    st.integers(min_value=1, max_value=3000),
    st.sampled_from([0, 7]),
    st.booleans(),
    st.booleans(),
    st.lists(st.integers(min_value=0), max_size=40),
)
def test_a_long_stream_is_read_as_it_passes_with_the_same_text_usage_and_model(
    tokens: int, usage_every: int, final_usage: bool, hide_usage: bool, cuts: list[int]
) -> None:
    """Past 64 kB the meter reads and drops what it holds: what it reports at the end is
    still the whole stream's (the text the tokenizer would count, the last usage, the
    model of the first events)."""
    stream, text, final = _long_stream(tokens, usage_every)
    if not final_usage:
        stream = stream[:-2] + stream[-1:]
    meter = StreamMeter(hide_usage)
    _fed(meter, _cut(b"".join(stream), cuts))
    assert meter.completion_text() == text
    assert meter.model() == "m"
    if final_usage:
        assert meter.usage() == final
    elif usage_every:
        last = (tokens - 1) // usage_every * usage_every
        assert meter.usage() == {"prompt_tokens": 3, "completion_tokens": last + 1}
    else:
        assert meter.usage() is None


@pytest.mark.parametrize("hide_usage", [False, True])
def test_what_a_stream_holds_is_bounded_by_its_text_not_its_chunks(hide_usage: bool) -> None:
    stream, text, _ = _long_stream(20_000)
    raw = b"".join(stream)
    meter = StreamMeter(hide_usage)
    tracemalloc.start()
    try:
        for start in range(0, len(raw), 997):  # pieces as a socket hands them over
            meter.feed(raw[start : start + 997])
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"\n{len(stream):,} events, {len(raw):,} bytes: the meter holds {held:,} bytes")
    # The text (129 kB here) and at most 64 kB of events with their objects, not 2.8 MB.
    assert held < len(text) + 100_000 < len(raw) // 10
    assert meter.completion_text() == text


def test_a_long_line_is_joined_a_few_times_not_once_per_piece() -> None:
    """An event that stays incomplete past 64 kB (one very long line, within
    `stream_max_line_bytes`) waits for twice its size before the meter joins it again."""
    content = "x" * 3_000_000
    raw = _content(content, injected_null=False)
    meter = StreamMeter(hide_usage=False)
    digests = 0
    digest = meter._digest

    def counted() -> None:
        nonlocal digests
        digests += 1
        digest()

    meter._digest = counted  # type: ignore[method-assign]
    for start in range(0, len(raw), 1024):
        meter.feed(raw[start : start + 1024])
    assert digests <= 8  # 64 kB, 128 kB, … 4 MB: not one per 1 kB piece (2,900)
    assert meter.completion_text() == content
