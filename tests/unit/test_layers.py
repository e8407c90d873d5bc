"""The package's layers (docs/design.md): each import points down, never back up; nothing
but the composition root and its two users build the daemon; the emulator stays apart; no
import cycle; a short top level; one class of each name.

Read from the source with `ast`, so that a forbidden import fails here even where no test
happens to run it."""

from __future__ import annotations

import ast
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import batchd

PACKAGE = Path(batchd.__file__).parent

# Lowest first. A module may import its own layer and the layers below it, never above.
# A module is in the layer of the longest name here that it starts with: "batchd" is the
# package's __init__ and any module not named below, so a new package is placed by hand.
LAYERS: tuple[tuple[str, ...], ...] = (
    # the base: errors, time, files, logs, fail points, local faults, records, systemd
    (
        "batchd",
        "batchd.errors",
        "batchd.clock",
        "batchd.fsutil",
        "batchd.logs",
        "batchd.failpoints",
        "batchd.faults",
        "batchd.models",
        "batchd.systemd",
    ),
    # the remote services: the Batch API (client, answers, profiles, prices, tokens) and
    # the object store of bucket folders
    ("batchd.provider", "batchd.objstore"),
    ("batchd.inputs",),  # PURE: judged alike by `batchd validate` and the daemon
    # The settings check themselves against the provider's profiles and prices and the
    # inputs' rules (a CSV encoding, the errors a report keeps): config sits above both,
    # which is why `batchd validate` without a configuration never loads pydantic.
    ("batchd.config", "batchd.store"),
    ("batchd.emulator",),  # a service of its own: only the base, provider/ and config
    ("batchd.outbox",),
    ("batchd.pipeline",),
    ("batchd.operator",),
    # the entry points: the composition root, the harness, the light client, the CLI
    ("batchd.daemon", "batchd.testing", "batchd.client", "batchd.cli", "batchd.__main__"),
)

# Imports that point up, each with why it is right.
UPWARD_ALLOWED = {
    ("batchd.objstore", "batchd.config"): (
        "a type only (under TYPE_CHECKING): `open_store(settings.storage)` is given the"
        " settings, which name bucket folders (`objstore.location`) and so sit above"
    ),
    ("batchd.objstore.bucket", "batchd.config"): (
        "a type only (under TYPE_CHECKING), as for batchd.objstore"
    ),
    ("batchd.inputs.verdict", "batchd.config"): (
        "a type only (under TYPE_CHECKING): `Rules.of(settings)` reads a loaded"
        " configuration, while `batchd validate` without one must not load pydantic"
    ),
}

# Who may import the composition root, and who may import the emulator.
DAEMON_USERS = ("batchd.daemon", "batchd.testing", "batchd.cli")
# The harness starts the emulator for tests; `batchd emulator` serves it and `batchd demo`
# runs the daemon against it.
EMULATOR_USERS = ("batchd.emulator", "batchd.testing", "batchd.cli")

MAX_TOP_LEVEL_MODULES = 16


@dataclass(frozen=True, slots=True)
class Import:
    importer: str
    imported: str
    line: int
    top: bool  # run when the importer is imported (module level, not for type checking)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def resolve(name: str, modules: set[str]) -> str:
    """`name` (`M` or `M.attr`) as the module it loads: the longest known module it names."""
    while name not in modules and "." in name:
        name = name.rpartition(".")[0]
    return name


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(source: str, importer: str, is_package: bool, modules: set[str]) -> Iterator[Import]:
    """Every batchd import in `source`, resolved to a module, and whether it runs at import
    time: at module level (also under if/try), not inside a function or `if TYPE_CHECKING`."""

    def visit(nodes: list[ast.stmt], top: bool) -> Iterator[Import]:
        for node in nodes:
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield Import(importer, resolve(alias.name, modules), node.lineno, top)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    package = importer.split(".") if is_package else importer.split(".")[:-1]
                    kept = package[: len(package) - (node.level - 1)]
                    base = ".".join([*kept, base] if base else kept)
                for alias in node.names:
                    name = resolve(f"{base}.{alias.name}", modules)
                    yield Import(importer, name, node.lineno, top)
            elif isinstance(node, ast.If):
                yield from visit(node.body, top and not _type_checking(node.test))
                yield from visit(node.orelse, top)
            elif isinstance(node, ast.Try):
                for block in (node.body, node.orelse, node.finalbody):
                    yield from visit(block, top)
                for handler in node.handlers:
                    yield from visit(handler.body, top)
            elif isinstance(node, ast.With):
                yield from visit(node.body, top)
            else:  # functions, classes, loops, match: their imports run later, if ever
                for child in ast.iter_child_nodes(node):
                    if isinstance(child, ast.stmt):
                        yield from visit([child], False)
                    elif isinstance(child, ast.match_case):
                        yield from visit(child.body, False)

    for found in visit(ast.parse(source).body, True):
        if found.imported == "batchd" or found.imported.startswith("batchd."):
            yield found


def all_imports() -> list[Import]:
    names = set(MODULES)
    return [
        found
        for name, path in MODULES.items()
        for found in imports_of(path.read_text(), name, path.name == "__init__.py", names)
        if found.imported != name
    ]


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def layer_of(module: str) -> int:
    """The layer of `module` (its longest prefix in LAYERS)."""
    best, rank = -1, 0
    for index, layer in enumerate(LAYERS):
        for prefix in layer:
            if within(module, prefix) and len(prefix) > best:
                best, rank = len(prefix), index
    return rank


def points_up(importer: str, imported: str) -> bool:
    return (importer, imported) not in UPWARD_ALLOWED and layer_of(imported) > layer_of(importer)


def builds_daemon_wrongly(importer: str, imported: str) -> bool:
    return within(imported, "batchd.daemon") and not any(
        within(importer, user) for user in DAEMON_USERS
    )


def imports_emulator_wrongly(importer: str, imported: str) -> bool:
    return within(imported, "batchd.emulator") and not any(
        within(importer, user) for user in EMULATOR_USERS
    )


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of a graph (each strongly connected part of more than one module,
    or a module importing itself), by Tarjan's algorithm."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            part = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                part.append(top)
                if top == node:
                    break
            if len(part) > 1 or node in edges.get(node, ()):
                found.append(sorted(part))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def import_time_graph(imports: list[Import]) -> dict[str, set[str]]:
    """Who loads whom on import: the module-level imports, each with the packages above the
    module it names (importing `batchd.a.b` runs `batchd.a` first)."""
    edges: dict[str, set[str]] = {}
    for found in imports:
        if not found.top:
            continue
        parts = found.imported.split(".")
        for depth in range(1, len(parts) + 1):
            target = ".".join(parts[:depth])
            if target != found.importer and not within(found.importer, target):
                edges.setdefault(found.importer, set()).add(target)
    return edges


def test_every_import_points_down_the_layers() -> None:
    imports = all_imports()
    assert len(imports) > 300  # the whole package was read
    wrong = [
        f"{i.importer}:{i.line} imports {i.imported}"
        for i in imports
        if points_up(i.importer, i.imported)
    ]
    assert not wrong, "an import points back up (see LAYERS):\n" + "\n".join(wrong)


def test_the_allowed_upward_imports_are_still_there() -> None:
    """An exception that is no longer needed is dropped, not kept to hide a new one."""
    pairs = {(i.importer, i.imported) for i in all_imports()}
    assert set(UPWARD_ALLOWED) <= pairs


def test_only_the_entry_points_build_the_daemon() -> None:
    wrong = [
        f"{i.importer}:{i.line}"
        for i in all_imports()
        if builds_daemon_wrongly(i.importer, i.imported)
    ]
    assert not wrong, "only daemon, testing and cli/ import batchd.daemon:\n" + "\n".join(wrong)


def test_only_the_harness_and_the_cli_import_the_emulator() -> None:
    wrong = [
        f"{i.importer}:{i.line} imports {i.imported}"
        for i in all_imports()
        if imports_emulator_wrongly(i.importer, i.imported)
    ]
    assert not wrong, "batchd does not run on the emulator's code:\n" + "\n".join(wrong)


def test_no_import_cycle() -> None:
    assert cycles(import_time_graph(all_imports())) == []


def test_the_top_level_is_short() -> None:
    top = sorted(path.name for path in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top


def test_no_two_classes_share_a_name() -> None:
    where: dict[str, list[str]] = {}
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                where.setdefault(node.name, []).append(name)
    assert len(where) > 100  # every class was seen
    shared = {cls: modules for cls, modules in where.items() if len(modules) > 1}
    assert not shared


# The rules themselves, on imports that would break them.
@pytest.mark.parametrize(
    ("importer", "source", "rule"),
    [
        ("batchd.inputs.verdict", "from batchd.pipeline.intake import Intake", points_up),
        ("batchd.outbox.merge", "from batchd.operator import ops", points_up),
        ("batchd.provider.api", "import batchd.daemon", points_up),
        ("batchd.pipeline.submit", "from batchd.operator.protocol import Reload", points_up),
        ("batchd.store", "from batchd.pipeline.holds import Hold", points_up),
        ("batchd.config", "from batchd.pipeline.budget import BudgetCaps", points_up),
        ("batchd.models", "from batchd.inputs.lines import read_line", points_up),
        ("batchd.operator.ops", "from batchd.daemon import Daemon", builds_daemon_wrongly),
        ("batchd.client", "from batchd import daemon", builds_daemon_wrongly),
        ("batchd.pipeline.poll", "from batchd.emulator.store import X", imports_emulator_wrongly),
        ("batchd.daemon", "from batchd.emulator import running", imports_emulator_wrongly),
    ],
)
def test_each_rule_catches_what_it_forbids(
    importer: str, source: str, rule: Callable[[str, str], bool]
) -> None:
    (found,) = imports_of(source, importer, False, set(MODULES))
    assert rule(found.importer, found.imported)


@pytest.mark.parametrize(
    ("importer", "source"),
    [
        ("batchd.pipeline.submit", "from batchd.provider.api import BatchApi"),
        ("batchd.outbox.remerge", "from batchd.store import Store"),
        ("batchd.config", "from batchd.provider.profiles import PROFILES"),
        ("batchd.inputs.verdict", "from batchd.config import Settings"),  # allowed, said why
        ("batchd.cli.demo", "from batchd.daemon import run"),
        ("batchd.testing", "from batchd.emulator import running"),
    ],
)
def test_the_rules_let_downward_imports_through(importer: str, source: str) -> None:
    (found,) = imports_of(source, importer, False, set(MODULES))
    assert not points_up(found.importer, found.imported)
    assert not builds_daemon_wrongly(found.importer, found.imported)
    assert not imports_emulator_wrongly(found.importer, found.imported)


def test_a_cycle_is_found_and_a_lazy_import_is_not_one() -> None:
    names = {"batchd.a", "batchd.b"}
    source_a = "from batchd.b import x\n"
    source_b = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from batchd.a import y\n"
    lazy_b = "def f():\n    from batchd.a import y\n"
    eager_b = "try:\n    from batchd.a import y\nexcept ImportError:\n    pass\n"
    for b, cyclic in ((source_b, False), (lazy_b, False), (eager_b, True)):
        found = [*imports_of(source_a, "batchd.a", False, names)]
        found += imports_of(b, "batchd.b", False, names)
        assert bool(cycles(import_time_graph(found))) is cyclic, b
