"""The modules of ``techniques/`` import one another in one direction: no module imports, even inside a function, a
module that imports it back (quantization, clustering and sensitivity once formed such a circle)."""

from __future__ import annotations

import ast
from pathlib import Path

TECHNIQUES = Path(__file__).resolve().parents[2] / "techniques"


def imports_of(path: Path) -> set[str]:
    """The sibling modules ``path`` imports (``from .x import y``, ``from . import x``), anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module.split(".")[0]} if node.module else {alias.name for alias in node.names}
    return found & {module.stem for module in TECHNIQUES.glob("*.py")}


def test_techniques_import_in_one_direction():
    graph = {path.stem: imports_of(path) for path in TECHNIQUES.glob("*.py") if path.stem != "__init__"}
    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> None:
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", f"import circle: {' -> '.join(trail + [module])}"
        state[module] = "open"
        for imported in sorted(graph.get(module, ())):
            visit(imported, trail + [module])
        state[module] = "done"

    for module in sorted(graph):
        visit(module, [])
