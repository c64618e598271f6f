"""Every example of the README runs, as written, against `meterline serve --demo`.

The rule: every ```bash, ```sh and ```python block is run, in the order of the README, unless
the line just before its fence is `<!-- not run: why -->` (installing, a compose deployment,
anything that cannot run in a test). A ```yaml block holding `providers:` is a providers file
and must parse as one. Other fences (plain ```: sample output) are not examples to run.

Shell blocks run with `bash` under `set -euo pipefail`, each in its own process; the shell
variables one block defines (the demo's `ML`, `KEY`, …, a `QUOTE_ID`) are handed to the next,
as in one terminal. `curl` fails on an HTTP error status (`--fail-with-body`), so an example
the server refuses fails the test. Python blocks run with this venv's python and the
variables the shell blocks exported. The demo runs on a free port with its own data
directory and database; `meterline` is this venv's.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from service.providers.config import parse_providers
from tests.support import ROOT, free_port, running

README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\s*$")
NOT_RUN = re.compile(r"^<!--\s*not run:\s*\S.*-->\s*$")
RUN_LANGUAGES = {"bash", "sh", "python"}
# Variables of the test's own environment that would stand in for what the README defines.
NOT_INHERITED = (
    "METERLINE_ADMIN_TOKEN",
    "METERLINE_PROVIDERS",
    "METERLINE_URL",
    "METERLINE_TOKEN",
    "METERLINE_HOST",
    "METERLINE_PORT",
)


@dataclass(frozen=True)
class Example:
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    run: bool


def readme_examples(text: str) -> list[Example]:
    examples = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        match = FENCE.match(lines[index])
        if not match:
            index += 1
            continue
        start = index
        index += 1
        while index < len(lines) and lines[index].rstrip() != "```":
            index += 1
        language = match.group(1)
        marked = start > 0 and NOT_RUN.match(lines[start - 1]) is not None
        code = "\n".join(lines[start + 1 : index]) + "\n"
        examples.append(
            Example(start + 1, language, code, language in RUN_LANGUAGES and not marked)
        )
        index += 1
    return examples


SHELL_PRELUDE = """\
set -euo pipefail
curl() { command curl --fail-with-body --show-error "$@"; }
__before=$(compgen -v | sort)
if [ -f "$STATE/vars.sh" ]; then . "$STATE/vars.sh"; fi
"""
# Hands every variable the block defined (or the blocks before it) to the next block.
SHELL_EPILOGUE = """
__bash_own='^(__.*|_|BASH_.*|PIPESTATUS|FUNCNAME|LINENO|RANDOM|SECONDS|REPLY|OPTARG|OPTIND)$'
__names=$(comm -13 <(echo "$__before") <(compgen -v | grep -Ev "$__bash_own" | sort))
if [ -n "$__names" ]; then declare -p $__names > "$STATE/vars.sh"; fi
env -0 > "$STATE/env"
"""


def run_example(
    example: Example, state: Path, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    if example.language == "python":
        exported = state / "env"
        if exported.exists():
            pairs = [item.split("=", 1) for item in exported.read_text().split("\0") if "=" in item]
            env = dict(pairs)
        command = [sys.executable, "-c", example.code]
    else:
        command = ["bash", "-c", SHELL_PRELUDE + example.code + SHELL_EPILOGUE]
    return subprocess.run(
        command, env=env, cwd=state, capture_output=True, text=True, timeout=60, check=False
    )


def test_not_run_markers_are_well_formed() -> None:
    """The README keeps its examples in fences this test knows: a typo'd marker is an error."""
    text = README.read_text()
    examples = readme_examples(text)
    assert sum(e.run for e in examples) >= 5
    for number, line in enumerate(text.splitlines(), 1):
        if "not run" in line and line.lstrip().startswith("<!--"):
            assert NOT_RUN.match(line), f"README.md:{number}: malformed marker {line!r}"
            following = text.splitlines()[number]
            assert FENCE.match(following), f"README.md:{number}: a marker must precede a fence"


def test_the_providers_file_example_is_a_valid_providers_file() -> None:
    files = [
        e
        for e in readme_examples(README.read_text())
        if e.language == "yaml" and e.code.startswith("providers:")
    ]
    assert files
    for example in files:
        assert parse_providers(example.code), f"README.md:{example.line}"


@pytest.fixture
def demo(
    fresh_database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[dict[str, str]]:
    """`meterline serve --demo` on a free port, and the environment its examples run in."""
    env = {k: v for k, v in os.environ.items() if k not in NOT_INHERITED}
    env.update(
        METERLINE_DATABASE_URL=fresh_database_url,
        METERLINE_DATA_DIR=str(tmp_path / "data"),
        METERLINE_LEDGER_FLUSH_INTERVAL_S="0.05",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        NO_PROXY="*",
    )
    for name in NOT_INHERITED:  # `running` starts from this process's environment
        monkeypatch.delenv(name, raising=False)
    port = free_port()
    with running(
        ["serve", "--demo", "--port", str(port)],
        f"http://127.0.0.1:{port}/healthz",
        env=env,
        log=tmp_path / "demo.log",
    ):
        yield env


def test_readme_examples_run_against_the_demo(demo: dict[str, str], tmp_path: Path) -> None:
    state = tmp_path / "examples"
    state.mkdir()
    env = {**demo, "STATE": str(state)}
    ran = 0
    for example in readme_examples(README.read_text()):
        if not example.run:
            continue
        result = run_example(example, state, env)
        assert result.returncode == 0, (
            f"README.md:{example.line} ({example.language}) exited {result.returncode}\n"
            f"--- code\n{example.code}--- stdout\n{result.stdout}--- stderr\n{result.stderr}"
        )
        ran += 1
    assert ran >= 5
