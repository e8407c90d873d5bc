"""The tests' own layout rule: helpers come from the one harness, `batchd.testing`.

No test module imports from conftest.py (fixtures reach tests through pytest) or from
another test module; the benchmark scripts under tests/bench may also share
tests/bench/common.py and start the real servers the tests start (the launchers of the
pytest plugins tests/objstore.py and tests/pg.py). A helper two test files need goes into
the harness."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
BENCH_SHARED = ("tests.bench.common", "tests.objstore", "tests.pg")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(TESTS.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported(source: str, module: str, is_package: bool = False) -> Iterator[tuple[int, str]]:
    """(line, dotted name) of everything `source` imports; for `from M import a`, `M.a`
    (a name in M or a submodule: either way it comes from M). Relative imports are
    resolved against `module`."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                kept = package[: len(package) - (node.level - 1)]
                base = ".".join([*kept, base] if base else kept)
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"


def forbidden(name: str, importer: str) -> bool:
    """Whether a test-tree module `importer` may not import `name`."""
    if importer.startswith("tests.bench.") and any(
        name == shared or name.startswith(shared + ".") for shared in BENCH_SHARED
    ):
        return False
    parts = name.split(".")
    return parts[0] in ("tests", "conftest") or any(
        part == "conftest" or part.startswith("test_") for part in parts
    )


def violations(path: Path) -> list[str]:
    module = module_name(path)
    source = path.read_text(encoding="utf-8")
    return [
        f"{path.relative_to(TESTS.parent)}:{line}: imports {name}"
        for line, name in imported(source, module, path.name == "__init__.py")
        if forbidden(name, module)
    ]


def test_no_test_module_imports_from_conftest_or_another_test_module() -> None:
    files = sorted(TESTS.rglob("*.py"))
    assert len(files) > 50  # the whole tree was read, not an empty folder
    found = [v for path in files for v in violations(path)]
    assert not found, "take helpers from batchd.testing instead:\n" + "\n".join(found)


def test_emulator_tests_live_in_their_own_folder() -> None:
    misplaced = [
        str(p.relative_to(TESTS.parent))
        for p in TESTS.rglob("test_emulator_*.py")
        if p.parent != TESTS / "emulator"
    ]
    assert not misplaced


@pytest.mark.parametrize(
    ("source", "importer", "bad"),
    [
        ("from tests.conftest import Api", "tests.emulator.test_x", True),
        ("from tests.unit.test_notify import FakeSystemd", "tests.integration.test_x", True),
        ("import tests.integration.daemon_harness", "tests.integration.test_x", True),
        ("from . import test_notify", "tests.unit.test_x", True),
        ("from .conftest import events", "tests.test_x", True),
        ("from ..bench.common import until", "tests.unit.test_x", True),
        ("from tests.bench.common import Row", "tests.integration.test_x", True),
        ("from tests.bench.common import Row", "tests.bench.bench_x", False),
        ("from tests.bench import common", "tests.bench.run", False),
        ("from batchd.testing import requests", "tests.unit.test_x", False),
        ("import pytest", "tests.unit.test_x", False),
    ],
)
def test_the_rule_catches_each_way_of_importing(source: str, importer: str, bad: bool) -> None:
    names = [name for _, name in imported(source, importer)]
    assert any(forbidden(name, importer) for name in names) is bad, names
