"""Structured logs: one key=value line per event. Secrets are never passed to a logger."""

from __future__ import annotations

import logging
import sys


def configure_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("ts=%(asctime)s level=%(levelname)s logger=%(name)s %(message)s")
    )
    root = logging.getLogger("meterline")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
