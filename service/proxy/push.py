"""An upstream body handed over piece by piece as aiohttp's parser produces it.

aiohttp's reader buffers each body piece and wakes the task awaiting `readany()`: per piece
a Future, a loop callback, a task step and the reader's own bookkeeping before the relay
sees it. A stream relays tens of thousands of pieces a second per worker, so `pushed` makes
the response's reader hand each piece to a `BodyTaker` at once, inside the parser's callback,
where the relay meters it and writes it to the client without a task switch.

A taker that cannot take a piece now (the client's send is waiting on a full socket) says
so, and the piece is buffered as aiohttp would have, with aiohttp's own flow control: past
its high-water mark the upstream is paused, and reading the buffer resumes it.

What this relies on in aiohttp (`tests/test_stream_push.py` fails if it changes):
- the response parser hands every body piece to `response.content.feed_data`, and ends the
  body with its `feed_eof` or `set_exception` (so do the read timeout and a lost connection);
- `StreamReader` declares `__slots__`, so a subclass declaring none may become an open
  reader's `__class__`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Protocol

from aiohttp import StreamReader


class BodyTaker(Protocol):
    def take(self, piece: bytes) -> bool:
        """Relay `piece` now (True), or leave it buffered in the reader (False)."""

    def wake(self) -> None:
        """The body ended (end of body or an error): whoever waits on it looks."""


# The taker of each pushing reader, by the reader's id (a slotted reader has no room for it).
_TAKERS: dict[int, BodyTaker] = {}


class _PushingReader(StreamReader):
    __slots__ = ()

    def feed_data(self, data: bytes, size: int = 0) -> bool:
        taker = _TAKERS.get(id(self))
        if data and taker is not None and taker.take(data):
            return False
        return super().feed_data(data, size)

    def feed_eof(self) -> None:
        super().feed_eof()
        self._wake()

    def set_exception(self, *args: Any, **kwargs: Any) -> None:
        super().set_exception(*args, **kwargs)
        self._wake()

    def _wake(self) -> None:
        taker = _TAKERS.get(id(self))
        if taker is not None:
            taker.wake()


@contextlib.contextmanager
def pushed(content: StreamReader, taker: BodyTaker) -> Iterator[None]:
    """While inside, `content`'s pieces go to `taker` as they arrive; after, it reads as before."""
    if type(content) is not StreamReader:
        raise TypeError(f"cannot push the pieces of a {type(content).__name__}")
    content.__class__ = _PushingReader
    _TAKERS[id(content)] = taker
    try:
        yield
    finally:
        del _TAKERS[id(content)]
        content.__class__ = StreamReader
