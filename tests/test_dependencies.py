"""What Meterline runs on is what its runtime lock installs: `pip install -r
requirements-runtime.lock` (the README's run command, the image) gets every package the
shipped code imports, and the test and bench toolchains stay in their extras."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

from tests.support import ROOT

SHIPPED = ("service", "pricing", "migrations")
# Extras the shipped code uses when installed (and answers a clear error without), pinned
# in the test lock rather than the runtime lock: module → extra.
OPTIONAL = {"pyarrow": "parquet"}


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(lock: Path) -> dict[str, str]:
    pins = {}
    for line in lock.read_text().splitlines():
        if line and not line.startswith(("#", "-")):
            name, _, pinned = line.partition("==")
            assert pinned, f"{lock.name}: {line!r} is not pinned"
            pins[_normalized(name)] = pinned
    return pins


def _imported_top_level(folder: Path) -> set[str]:
    names: set[str] = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module.split(".")[0])
    return names


def test_the_runtime_lock_installs_every_package_the_shipped_code_imports() -> None:
    runtime = _pins(ROOT / "requirements-runtime.lock")
    providers = packages_distributions()
    missing = {}
    for folder in SHIPPED:
        for module in _imported_top_level(ROOT / folder):
            if module in sys.stdlib_module_names or module in SHIPPED or module == "__future__":
                continue
            if module in OPTIONAL:
                continue
            distributions = {_normalized(d) for d in providers.get(module, [module])}
            if not distributions & runtime.keys():
                missing[module] = sorted(distributions)
    assert not missing, f"imported by the shipped code, not in the runtime lock: {missing}"


def test_the_test_and_bench_toolchains_are_not_runtime_dependencies() -> None:
    runtime = _pins(ROOT / "requirements-runtime.lock")
    for tool in ("pytest", "mypy", "ruff", "openai", "playwright", "httpx-aiohttp"):
        assert tool not in runtime
    everything = _pins(ROOT / "requirements.lock")
    assert {"pytest", "httpx-aiohttp"} <= everything.keys()
    assert not everything.keys() & runtime.keys()  # each pin written once
    lines = (ROOT / "requirements.lock").read_text().splitlines()
    assert "-r requirements-runtime.lock" in lines and lines[-1] == "-e .[test,bench,parquet]"


def test_optional_extras_are_declared_and_pinned_for_the_tests() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    everything = _pins(ROOT / "requirements.lock")
    runtime = _pins(ROOT / "requirements-runtime.lock")
    for module, extra in OPTIONAL.items():
        assert any(_normalized(d).startswith(module) for d in extras[extra])
        assert module in everything and module not in runtime
