"""The code's shape: no module imports another that imports it back (directly or around a loop), counting imports
inside functions too, so the layout stays a one-way street a newcomer can follow."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("fastimagenet", "loaders", "dataset_tools")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Project modules `path` imports anywhere in its body (TYPE_CHECKING-only imports excluded)."""
    found = set()
    tree = ast.parse(path.read_text())
    type_only = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
                 and ast.unparse(block.test) == "TYPE_CHECKING" for node in ast.walk(block)}
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        found |= {name for name in names if name in modules}
    return found


def import_graph() -> dict[str, list[str]]:
    files = {_module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
    return {name: sorted(_imports(path, set(files)) - {name}) for name, path in files.items()}


def test_no_import_cycles():
    # Parsed in a process of its own: in CPython 3.11 threads share the AST constructor's recursion counter, and a
    # thread an earlier test left running (numba compiling in an FFCV epoch thread parses source too) can make
    # ast.parse here fail with "AST constructor recursion depth mismatch".
    child = subprocess.run([sys.executable, "-c", "import json; from tests.test_layout import import_graph; "
                            "print(json.dumps(import_graph()))"], cwd=ROOT, capture_output=True, text=True)
    assert child.returncode == 0, child.stderr
    graph = {name: set(imported) for name, imported in json.loads(child.stdout).items()}
    for name, imported in graph.items():  # a package's __init__ runs before any of its modules: an edge to it
        package = name.rpartition(".")[0]
        if package in graph and package != name:
            imported.add(package)

    def cycle_from(start):
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    return path + [start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
        return None

    cycles = [cycle for cycle in map(cycle_from, graph) if cycle]
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
