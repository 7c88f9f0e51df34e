"""The floor plan: padkd's modules form layers, and no import points up a layer or closes a cycle.

Read from the source with `ast` (module-level and function-level imports alike; `if TYPE_CHECKING:` blocks
are type hints only and are skipped), so a new upward import fails here, not in a user's import.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "padkd"

#: Bottom to top. A unit may import its own layer and the layers below it, never above.
LAYERS: list[set[str]] = [
    {"errors", "ops", "registry", "batch", "distributed", "discrepancy", "plugins", "files",
     "placement"},  # torch-level utilities
    {"context", "checkpoint", "lmcache", "config"},  # what methods see when they build; file formats; the pure schema
    {"taps", "data", "weightings", "methods"},  # what is matched and how samples count: independent axes
    {"tasks", "models"},
    {"distiller"},
    {"assemble", "validate"},  # config -> objects, and the registry checks of a config
    {"engine"},
    {"report"},
    {"demos", "study", "cli", "__init__", "__main__"},
]
LAYER = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}


def _unit(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0].removesuffix(".py")


def _named(name: str) -> str:
    """The unit `from padkd import name` reaches: a submodule, or the package's own namespace."""
    return name if (SRC / f"{name}.py").exists() or (SRC / name).is_dir() else "__init__"


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> list[str]:
    """Every padkd unit a module imports, outside `if TYPE_CHECKING:` blocks."""
    found: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            parts = node.module.split(".")
            if parts[0] == "padkd":
                found.extend([parts[1]] if len(parts) > 1 else [_named(a.name) for a in node.names])
        elif isinstance(node, ast.Import):
            found.extend(a.name.split(".")[1] for a in node.names if a.name.startswith("padkd."))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        unit = _unit(path)
        edges.setdefault(unit, set()).update(u for u in _imports(ast.parse(path.read_text())) if u != unit)
    return edges


def test_every_unit_has_a_layer() -> None:
    assert set(_graph()) <= set(LAYER), f"put these in LAYERS: {sorted(set(_graph()) - set(LAYER))}"


def test_no_import_points_up_a_layer() -> None:
    upward = sorted(f"{a} -> {b}" for a, targets in _graph().items() for b in targets if LAYER[b] > LAYER[a])
    assert not upward, f"imports from a lower layer up to a higher one: {upward}"


def test_no_import_cycle() -> None:
    import graphlib

    try:
        list(graphlib.TopologicalSorter(_graph()).static_order())
    except graphlib.CycleError as err:
        pytest.fail(f"import cycle: {' -> '.join(err.args[1])}")


def test_weightings_and_methods_know_only_the_contract() -> None:
    graph = _graph()
    assert "methods" not in graph["weightings"] and "weightings" not in graph["methods"]
    assert not {"tasks", "models", "engine"} & (graph["weightings"] | graph["methods"])


def test_parsing_a_config_loads_no_registry_and_no_torch() -> None:
    code = ("import sys, padkd.config; assert not [m for m in sys.modules if m == 'torch' or m.startswith("
            "('padkd.methods', 'padkd.models', 'padkd.weightings', 'padkd.tasks'))], sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)
