"""The dependency picture: rag ← finetune ← hybrid, no module importing a higher layer, no import loops."""

from __future__ import annotations

import ast
from pathlib import Path

LAYERS = {"rag": 0, "finetune": 1, "hybrid": 2}


def imports(path: Path, top_level_only: bool) -> set[str]:
    """openbook modules ``path`` imports (``rag.index``; ``from rag import metrics`` counts as ``rag.metrics``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in out if m.split(".")[0] in LAYERS}


def modules() -> dict[str, Path]:
    return {f"{p.parent.name}.{p.stem}": p for pkg in LAYERS for p in Path(pkg).glob("*.py")
            if p.stem not in ("__init__", "__main__")}


def test_no_module_imports_a_higher_layer():
    for name, path in modules().items():
        for m in imports(path, top_level_only=False):  # lazy imports inside functions count too
            assert LAYERS[m.split(".")[0]] <= LAYERS[name.split(".")[0]], f"{name} imports {m}"


def test_no_import_loops():
    mods = modules()
    graph = {n: {m for m in imports(p, top_level_only=False) if m in mods and m != n} for n, p in mods.items()}
    state: dict[str, int] = {}

    def visit(n: str, path: list[str]) -> None:
        state[n] = 1
        for m in graph[n]:
            assert state.get(m) != 1, "import loop: " + " -> ".join([*path[path.index(m):], m])
            if m not in state:
                visit(m, [*path, m])
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n, [n])


def test_no_module_imports_a_command_line():
    for name, path in modules().items():
        if not name.endswith((".cli", ".console")):
            assert not {m for m in imports(path, top_level_only=False) if m.endswith(".cli")}, name
