"""The module map in docs/ARCHITECTURE.md holds: imports run downwards only, no cycles, modules stay small."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "medtransfer"

# Lower number = lower layer. A module may import its own unit and any unit of a strictly lower layer.
LAYERS: dict[str, int] = {
    "errors": 0,
    "safeio": 1,
    "runtime": 2,
    "rundir": 2,
    "task": 2,
    "config": 3,
    "data": 3,
    "models": 3,
    "ood": 3,
    "artifacts": 4,
    "privacy": 4,
    "evaluation": 5,
    "explain": 5,
    "predict": 5,
    "export": 5,
    "train": 6,
    "serving": 6,
    "adapt": 6,
    "demo": 7,
    "experiment": 7,
    "api": 7,
    "cli": 8,
}
MAX_MODULE_LINES = 460


def _unit(module: str) -> str:
    """'medtransfer.data.split' -> 'data'; 'medtransfer.cli' -> 'cli'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _modules() -> list[tuple[str, Path]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(relative.parts)
        found.append((name.removesuffix(".__init__"), path))
    return found


def _imports(path: Path) -> set[str]:
    """Every medtransfer module a file imports, at module level, inside functions or for annotations."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("medtransfer"):
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names if alias.name.startswith("medtransfer"))
    return names


MODULES = _modules()


def test_every_unit_has_a_layer():
    units = {_unit(name) for name, _ in MODULES} - {""}
    assert units <= set(LAYERS), f"add these to LAYERS and docs/ARCHITECTURE.md: {sorted(units - set(LAYERS))}"


@pytest.mark.parametrize("name,path", MODULES, ids=[name for name, _ in MODULES])
def test_imports_run_downwards(name, path):
    own = _unit(name)
    if not own:
        return
    known = {module for module, _ in MODULES}
    upward = sorted(
        target
        for target in _imports(path)
        if target in known and _unit(target) and _unit(target) != own and LAYERS[_unit(target)] >= LAYERS[own]
    )
    assert not upward, f"{name} (layer {LAYERS[own]}) imports a module of the same or a higher layer: {upward}"


def test_no_import_cycles_between_modules():
    known = {module for module, _ in MODULES}
    graph = {name: {t for t in _imports(path) if t in known and t != name} for name, path in MODULES}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for target in graph[node]:
            if state.get(target) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*trail, node, target]))
            if target not in state:
                visit(target, [*trail, node])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [])


@pytest.mark.parametrize("name,path", MODULES, ids=[name for name, _ in MODULES])
def test_modules_stay_small(name, path):
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_MODULE_LINES, f"{name} has {lines} lines; split it by concern (limit {MAX_MODULE_LINES})"
