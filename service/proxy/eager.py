"""Awaitables run at once, as far as they go without waiting: Python 3.12's eager tasks, for
the two places the proxy needs them on 3.11.

- `finish` runs to its end a coroutine (or an `__await__` generator) that was started by hand
  and had to wait: the stream relay starts each send inside aiohttp's parser callback.
- `eager_body_writes` makes aiohttp write a request's body at once. On Python < 3.12 aiohttp
  hands the body to a task of its own (on 3.12 and later it starts that task eagerly), so
  the body left one turn of the event loop after the headers, and under load a turn is
  milliseconds of other requests' work, spent before the provider could start answering.
  The writer almost never waits (the socket's buffer is empty), so it now runs inside
  `request()`; when it does wait, a task finishes it, as before.

What this relies on in aiohttp (`tests/test_eager_writes.py` fails if it changes): the body
is written by `ClientRequest.write_bytes`, passed to `asyncio.create_task`, and a writer
task already done is dropped (aiohttp's own test for an eager start).
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Coroutine, Generator
from typing import Any

from aiohttp.client_reqrep import ClientRequest

_BODY_WRITER = ClientRequest.write_bytes.__code__

# What `finish` resumes: an `__await__` generator or a coroutine, both driven by send/throw.
Started = Generator[Any, None, Any] | Coroutine[Any, Any, Any]


async def finish(waiting: Started, awaited: Any) -> None:
    """Run to its end `waiting`, started by hand, which had to wait on `awaited`, as a task
    would.

    The wait is for `awaited` to be done (not an `await` of it: the generator's own `await`
    still holds it), then the generator resumes and sees its outcome."""
    while True:
        try:
            if awaited is None:  # a bare yield: one turn of the loop
                await asyncio.sleep(0)
            else:
                await asyncio.wait((awaited,))
        except BaseException as exc:  # this task cancelled: so is the generator, where it waits
            try:
                awaited = waiting.throw(exc)
            except StopIteration:
                return
            continue
        try:
            awaited = waiting.send(None)
        except StopIteration:
            return


def _eager_body_writer(
    loop: asyncio.AbstractEventLoop, coro: Any, /, **kwargs: Any
) -> asyncio.Future[Any]:
    """The loop's task factory: aiohttp's body writer started at once, every other task as
    the loop would make it."""
    if getattr(coro, "cr_code", None) is not _BODY_WRITER:
        return asyncio.Task(coro, loop=loop, **kwargs)
    context = kwargs.pop("context", None) or contextvars.copy_context()
    try:
        awaited = context.run(coro.send, None)
    except StopIteration:  # written: the usual case
        done: asyncio.Future[None] = loop.create_future()
        done.set_result(None)
        return done
    except Exception as exc:  # what a task would have held (aiohttp drops a done one)
        failed: asyncio.Future[None] = loop.create_future()
        failed.set_exception(exc)
        failed.exception()  # retrieved: the writer told the connection already
        return failed
    return asyncio.Task(finish(coro, awaited), loop=loop, context=context, **kwargs)


def eager_body_writes(loop: asyncio.AbstractEventLoop) -> None:
    """Install the factory on `loop` (each worker's, at start-up), unless it has one."""
    if loop.get_task_factory() is None:
        loop.set_task_factory(_eager_body_writer)
