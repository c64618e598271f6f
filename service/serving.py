"""Serving an app on uvicorn, one listening socket per worker.

uvicorn's workers share one listening socket, and each accepts whatever is queued when it
wakes: a burst of connections (a client pool opening 500 keep-alive connections, a load
balancer starting) goes mostly to whichever worker woke first, and stays there. Measured
with 500 streams on two workers: 64 % on one, 36 % on the other, the busier one's
latency paying for both. Here each worker binds a socket of its own with `SO_REUSEPORT`,
and the kernel spreads new connections over them by hash, evenly.

uvicorn's supervisor is kept (health checks, restarts, signals): it hands each worker it
starts the parent's list of sockets, pickled. The list holds one `WorkerListener`, which
unpickles in the worker as a socket that worker binds itself. A worker that dies takes
its socket with it, so the kernel sends new connections to the others until its
replacement binds again.
"""

from __future__ import annotations

import logging
import socket
import sys
from collections.abc import Callable
from contextlib import suppress
from typing import Any

import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess

# Linux balances connections over sockets sharing a port; other systems give them all to
# one socket (or refuse the second bind), so there the workers share uvicorn's socket.
BALANCED = sys.platform == "linux" and hasattr(socket, "SO_REUSEPORT")


def _bound(family: int, address: tuple[Any, ...], backlog: int) -> socket.socket:
    """In a worker: its own socket on the shared port, listening. A worker that cannot bind
    is a failed start (uvicorn's supervisor then stops, rather than restart it forever)."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        logging.getLogger("uvicorn.error").error("cannot listen on %s: %s", address, exc)
        sys.exit(STARTUP_FAILURE)
    return sock


class WorkerListener(socket.socket):
    """In the parent, an unbound socket that only names the address; pickled into a
    worker, that worker's own listening socket on it (see the module's docstring)."""

    def __init__(self, host: str, port: int, backlog: int) -> None:
        family, _, _, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        super().__init__(family, socket.SOCK_STREAM)
        self.address = address
        self.backlog = backlog

    def __reduce__(self) -> tuple[Callable[..., socket.socket], tuple[Any, ...]]:
        return _bound, (self.family, self.address, self.backlog)


def serve_app(factory: str, host: str, port: int, workers: int, **options: Any) -> None:
    """Serve the app `factory` builds in each of `workers` processes, on uvloop and
    httptools (with a response's headers written together with its first body piece:
    service/http_protocol.py); uvicorn's own logs only for warnings (Meterline writes its
    own access lines)."""
    settings: dict[str, Any] = {
        "factory": True,
        "host": host,
        "port": port,
        "workers": workers,
        "loop": "uvloop",
        "http": "service.http_protocol:HttpProtocol",
        "log_level": "warning",
        **options,
    }
    if workers == 1 or not BALANCED:
        uvicorn.run(factory, **settings)
        return
    config = uvicorn.Config(factory, **settings)
    with WorkerListener(host, port, config.backlog) as listener, suppress(KeyboardInterrupt):
        Multiprocess(config, sockets=[listener]).run()
