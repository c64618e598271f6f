"""Set up Prometheus' multiprocess mode before `meterline serve` starts its workers.

Kept apart from `registry` on purpose: importing `prometheus_client` fixes how values are
stored, so this must run before anything imports it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

ENV = "PROMETHEUS_MULTIPROC_DIR"


def prepare(data_dir: Path) -> Path:
    """Point the workers at an empty `metrics/` folder of the data directory (unless set)."""
    configured = os.environ.get(ENV)
    if configured:
        return Path(configured)
    path = (data_dir / "metrics").resolve()
    # Files of a previous run would be summed with this one's (and their live gauges never
    # cleared): counters restart at zero, which Prometheus handles as a reset.
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    os.environ[ENV] = str(path)
    return path
