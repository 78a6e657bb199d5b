"""The code's shape, read from every import in the source (inside functions and under `if TYPE_CHECKING:` too):
layers with one direction, and no module that needs itself, so a newcomer can follow the code one way.

The layers, lowest first: fastimagenet.common (errors, whole-or-absent writes, the ranks' barrier, torch's thread
count), fastimagenet.dataset_tools (formats, image rules, scanning), fastimagenet.loaders (the backends and their
options), the rest of fastimagenet (the config, the loop, the commands). A module imports its own layer and those
below it, never one above."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
# folder of the repository -> the package it installs as (pyproject.toml, [tool.setuptools.package-dir])
FOLDERS = {"fastimagenet": "fastimagenet", "dataset_tools": "fastimagenet.dataset_tools",
           "loaders": "fastimagenet.loaders"}
LAYERS = ("fastimagenet.common", "fastimagenet.dataset_tools", "fastimagenet.loaders", "fastimagenet")
ORDER = "fastimagenet.common -> fastimagenet.dataset_tools -> fastimagenet.loaders -> the rest of fastimagenet"


class Import(NamedTuple):
    path: str  # the importing file, relative to the repository
    line: int
    source: str  # the importing module
    target: str  # the module imported (`from package import name`: package.name where that is a module)
    runtime: bool  # False under `if TYPE_CHECKING:` (read by type checkers, never run)


def layer_of(module: str) -> int:
    """The index in LAYERS of the innermost layer holding `module`. The root package runs before every module of
    the project, so it belongs to the base."""
    if module == "fastimagenet":
        return 0
    holding = [layer for layer in LAYERS if module == layer or module.startswith(layer + ".")]
    return LAYERS.index(max(holding, key=len))


def module_files() -> dict[str, tuple[Path, bool]]:
    """Every module of the project: name -> (file, whether a package). A C extension counts by its source, which
    setup.py names after the module."""
    modules = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix in (".py", ".c"):
                parts = path.relative_to(ROOT / folder).with_suffix("").parts
                is_package = parts[-1] == "__init__"
                modules[".".join((package, *(parts[:-1] if is_package else parts)))] = (path, is_package)
    return modules


def imports_in(source: str, path: str, module: str, is_package: bool, modules: set[str]) -> list[Import]:
    """The project imports of one file: those of fastimagenet, and any of a bare top-level name of FOLDERS (which
    the layer check reports), relative ones resolved."""
    tree = ast.parse(source)
    type_only = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
                 and ast.unparse(block.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
                 for statement in block.body for node in ast.walk(statement)}
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        found += [Import(path, node.lineno, module, target, id(node) not in type_only)
                  for target in dict.fromkeys(targets) if target.split(".")[0] in ("fastimagenet", *FOLDERS)]
    return sorted(found, key=lambda i: i.line)


def project_imports() -> list[Import]:
    modules = module_files()
    return [found for name, (path, is_package) in modules.items() if path.suffix == ".py"
            for found in imports_in(path.read_text(), str(path.relative_to(ROOT)), name, is_package, set(modules))]


def layer_violations(imports: list[Import]) -> list[str]:
    """One line per import against the layers: the file, the line, what it imports and the rule it breaks."""
    found = []
    for i in imports:
        where = f"{i.path}:{i.line}: {i.source} imports {i.target}"
        if i.target.split(".")[0] != "fastimagenet":
            found.append(f"{where}: the package installs as fastimagenet.{i.target}, import it by that name")
        elif layer_of(i.target) > layer_of(i.source):
            found.append(f"{where}: {LAYERS[layer_of(i.source)]} may not import {LAYERS[layer_of(i.target)]} "
                         f"(layers, lowest first: {ORDER})")
    return found


def import_cycles(imports: list[Import]) -> list[list[str]]:
    """Cycles in two graphs. As run: the imports that execute, and from each module to its package (a package's
    __init__ runs before any of its modules). As written: every import, TYPE_CHECKING ones included (a module
    whose names depend on itself)."""
    def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
        def cycle_from(start):
            stack, seen = [(start, [start])], set()
            while stack:
                node, path = stack.pop()
                for nxt in sorted(edges.get(node, ())):
                    if nxt == start:
                        return path + [start]
                    if nxt not in seen:
                        seen.add(nxt)
                        stack.append((nxt, path + [nxt]))
            return None
        return [cycle for cycle in map(cycle_from, sorted(edges)) if cycle]

    as_run, as_written = {}, {}
    for i in imports:
        if i.target != i.source:
            as_written.setdefault(i.source, set()).add(i.target)
            if i.runtime:
                as_run.setdefault(i.source, set()).add(i.target)
    for name in module_files():
        package = name.rpartition(".")[0]
        if package:
            as_run.setdefault(name, set()).add(package)
    return cycles(as_run) + cycles(as_written)


def _in_child(expression: str):
    """`expression` evaluated in a process of its own, through JSON. There ast.parse runs alone: in CPython 3.11
    threads share the AST constructor's recursion counter, and a thread an earlier test left running (numba
    compiling in an FFCV epoch thread parses source too) can make ast.parse fail with "AST constructor recursion
    depth mismatch"."""
    child = subprocess.run([sys.executable, "-c", "import json; from tests.test_layout import *; "
                            f"print(json.dumps({expression}))"], cwd=ROOT, capture_output=True, text=True)
    assert child.returncode == 0, child.stderr
    return json.loads(child.stdout)


def test_imports_follow_the_layers():
    violations = _in_child("layer_violations(project_imports())")
    assert not violations, "imports against the layers:\n" + "\n".join(violations)


def test_no_import_cycles():
    cycles = _in_child("import_cycles(project_imports())")
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


# A loader module that imports upward three ways (a TYPE_CHECKING import, one inside a function, a relative one)
# and once by the bare folder name, and a base module that imports a loader.
_UPWARD = '''from __future__ import annotations
from typing import TYPE_CHECKING
from . import base
if TYPE_CHECKING:
    from fastimagenet.config import Config


def build():
    from ..train import fit
    import loaders
'''


def test_the_layer_check_names_file_line_and_rule():
    modules = ["fastimagenet.config", "fastimagenet.train", "fastimagenet.loaders.base"]
    found = _in_child(f"layer_violations(imports_in({_UPWARD!r}, 'loaders/x.py', 'fastimagenet.loaders.x', False, "
                      f"{set(modules)!r}) + imports_in('from fastimagenet.loaders import base', "
                      "'fastimagenet/common/x.py', 'fastimagenet.common.x', False, set()))")
    rule = "fastimagenet.loaders may not import fastimagenet (layers, lowest first: "
    assert found == [f"loaders/x.py:5: fastimagenet.loaders.x imports fastimagenet.config: {rule}{ORDER})",
                     f"loaders/x.py:9: fastimagenet.loaders.x imports fastimagenet.train: {rule}{ORDER})",
                     "loaders/x.py:10: fastimagenet.loaders.x imports loaders: the package installs as "
                     "fastimagenet.loaders, import it by that name",
                     "fastimagenet/common/x.py:1: fastimagenet.common.x imports fastimagenet.loaders: "
                     f"fastimagenet.common may not import fastimagenet.loaders (layers, lowest first: {ORDER})"]


def test_a_type_checking_import_back_is_a_cycle():
    imports = [["loaders/base.py", 3, "fastimagenet.loaders.base", "fastimagenet.config", False],
               ["fastimagenet/config.py", 20, "fastimagenet.config", "fastimagenet.loaders.base", True]]
    cycles = _in_child(f"import_cycles([Import(*i) for i in {imports!r}])")
    assert ["fastimagenet.config", "fastimagenet.loaders.base", "fastimagenet.config"] in cycles
