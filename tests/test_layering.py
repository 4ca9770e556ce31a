"""The package's layers, read from its source: who may import whom, and no import circles.

Every import counts, wherever it stands (module level, inside a function, under ``TYPE_CHECKING``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import embconstraint

ROOT = Path(embconstraint.__file__).parent
PKG = "embconstraint"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The embconstraint modules ``path`` imports (a ``from X import name`` counts X, and X.name
    when that is a module)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == PKG}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != PKG:
                continue
            found.add(target)
            for alias in node.names:
                if f"{target}.{alias.name}" in MODULES:
                    found.add(f"{target}.{alias.name}")
    return found - {name}


MODULES = {_module_name(p): p for p in ROOT.rglob("*.py")}
GRAPH = {name: _imports(path) for name, path in MODULES.items()}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_the_modules_are_found():
    assert {
        "embconstraint.core",
        "embconstraint._mechanism.weight",
        "embconstraint.files.verify",
        "embconstraint.hf",
        "embconstraint.lightning.callback",
        "embconstraint.demo.run",
    } <= set(MODULES)


def test_no_import_circles():
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in sorted(GRAPH.get(m, ())):
            if state.get(n) == 1:
                pytest.fail("import circle: " + " -> ".join(path[path.index(n) :] + [n]))
            if n in GRAPH and not state.get(n):
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if not state.get(m):
            visit(m)


@pytest.mark.parametrize(
    "module", sorted(m for m in MODULES if _layer(m) in ("_mechanism", "_common", "exceptions"))
)
def test_the_mechanism_imports_no_other_layer(module):
    allowed = {"_mechanism", "_common", "exceptions"} if _layer(module) == "_mechanism" else set()
    assert {_layer(n) for n in GRAPH[module]} <= allowed, GRAPH[module]


@pytest.mark.parametrize(
    "module",
    [
        "embconstraint.files.formats",
        "embconstraint.files.writing",
        "embconstraint.files.export",
        "embconstraint.files.verify",
        "embconstraint.files.rows_file",
    ],
)
def test_reading_files_needs_no_mechanism(module):
    assert {_layer(n) for n in GRAPH[module]} <= {"files", "_common", "exceptions"}, GRAPH[module]


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _layer(m) not in ("_mechanism",)))
def test_the_mechanism_is_used_through_its_declared_interface(module):
    inside = sorted(n for n in GRAPH[module] if n.startswith("embconstraint._mechanism."))
    assert not inside, f"{module} imports {inside}; import from embconstraint._mechanism"


def test_the_declared_interface_is_complete():
    import embconstraint._mechanism as mechanism

    assert sorted(mechanism.__all__) == sorted(set(mechanism.__all__))
    assert all(hasattr(mechanism, name) for name in mechanism.__all__)


@pytest.mark.parametrize("layer", ["lightning", "hf", "files", "demo"])
def test_integrations_do_not_import_each_other_at_module_level(layer):
    """An integration imports the front door, the mechanism's interface and the file formats; the
    demo may use the Lightning callback (it is a Lightning demo)."""
    allowed = {"", "core", "_mechanism", "_common", "exceptions", "files", layer}
    if layer == "demo":
        allowed |= {"lightning"}
    for module in (m for m in MODULES if _layer(m) == layer):
        assert {_layer(n) for n in GRAPH[module]} <= allowed, (module, GRAPH[module])


def test_every_public_exception_is_exported():
    import embconstraint.exceptions as exceptions

    for name in exceptions.__all__:
        cls = getattr(exceptions, name)
        assert issubclass(cls, Exception) and getattr(embconstraint, name) is cls
        assert name in embconstraint.__all__
