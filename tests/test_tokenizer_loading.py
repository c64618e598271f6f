"""The tokenizer is loaded when a first request needs a count, once, off the event loop.

Its tables cost a worker about 45 MB; a deployment whose providers report usage and whose
accounts have no budget or token limit never needs them. Run in a fresh interpreter, so
that nothing else of the test run has loaded them already.
"""

from __future__ import annotations

import subprocess
import sys

_PROBE = """
import asyncio, threading
from service.tokens import estimate

assert not estimate._loaded and estimate._encoding.cache_info().currsize == 0
loads = []
warm_up = estimate.warm_up
def counted():
    loads.append(threading.get_ident())
    warm_up()
estimate.warm_up = counted

async def main():
    ticks = 0
    async def tick():
        nonlocal ticks
        while not estimate._loaded:
            ticks += 1
            await asyncio.sleep(0.001)
    ticking = asyncio.create_task(tick())
    await asyncio.gather(*(estimate.ready() for _ in range(10)))
    await ticking
    assert len(loads) == 1, loads                   # ten callers, one load
    assert loads[0] != threading.get_ident(), loads  # in a thread, not on the loop
    assert ticks >= 3, ticks                         # the loop ran on meanwhile
    await estimate.ready()
    assert len(loads) == 1
    print(estimate.count_tokens("hello world"))

asyncio.run(main())
"""


def test_the_tokenizer_loads_once_off_the_loop_when_first_needed() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["2"]
