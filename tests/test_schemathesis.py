"""The billing API survives schema-driven fuzzing: schemathesis, run as its users run it (the
`st` command) against a live `meterline serve` with the admin token, finds no 500, no
response that breaks the published OpenAPI schema, and no error code its operation does not
document.

Besides what the schema implies, strings carry NUL and other control characters, edge
months and instants and forged cursors (`tests/schemathesis_hooks.py`), and the stateful
phase follows the schema's links from each create to the operations on what it made.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ADMIN_TOKEN, Upstream, start_meterline
from tests.reliability import meterline_settings, own_database

# Per operation (and per stateful scenario); the run stays under about two minutes of CI.
MAX_EXAMPLES = os.environ.get("METERLINE_SCHEMATHESIS_EXAMPLES", "60")
HOOKS = Path(__file__).with_name("schemathesis_hooks.py")
CHECKS = ",".join(
    [
        "not_a_server_error",
        "response_schema_conformance",
        "content_type_conformance",
        "status_code_conformance",
        "documented_error_code",  # tests/schemathesis_hooks.py
    ]
)


@pytest.mark.slow
def test_the_billing_api_under_schemathesis(
    postgres_server: str, template_database: str, upstream: Upstream, tmp_path: Path
) -> None:
    with (
        own_database(postgres_server, template_database) as url,
        start_meterline(url, upstream, tmp_path / "server", **meterline_settings()) as m,
    ):
        report = tmp_path / "report"
        command = [
            str(Path(sys.executable).with_name("st")),
            "run",
            f"{m.url}/openapi.json",
            "--header",
            f"Authorization: Bearer {ADMIN_TOKEN}",
            "--checks",
            CHECKS,
            "--max-examples",
            MAX_EXAMPLES,
            "--phases",
            "examples,coverage,fuzzing,stateful",
            # One worker: with two, schemathesis's threads call `ast.parse` at once (hypothesis
            # describing its lambdas), which Python 3.11 does not survive ("AST constructor
            # recursion depth mismatch", a Runtime Error of the run, not a finding).
            "--workers",
            "1",
            "--seed",
            "7",
            "--generation-database",
            "none",
            "--request-timeout",
            "30",
            "--no-color",
            "--report",
            "junit",
            "--report-dir",
            str(report),
        ]
        # In the test's folder: `st` keeps state in ./.schemathesis.
        run = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=900,
            cwd=tmp_path,
            env={**os.environ, "SCHEMATHESIS_HOOKS": str(HOOKS)},
        )
    summary = run.stdout[-6000:]
    print("\n" + summary)
    # What failed, however long the output: the lines marked as failures or errors.
    flagged = [line for line in run.stdout.splitlines() if "❌" in line or "Error" in line]
    assert run.returncode == 0, "\n".join(
        [*flagged[:40], _errors_section(run.stdout), run.stderr[-2000:], summary]
    )


def _errors_section(output: str) -> str:
    """The run's ERRORS section (an error inside schemathesis, with its traceback): the
    summary names only its kind."""
    start = output.find("= ERRORS =")
    if start < 0:
        return ""
    end = output.find("= WARNINGS =", start)
    return output[start : end if end > 0 else start + 4000][:4000]
