"""Layers import downwards only: the import graph of `src/finesmith`, read with `ast`.

Every `import` and `from ... import` in every module is read, at module level and inside
functions (a function-level import still is a dependency; it only runs later). Imports
under `if TYPE_CHECKING:` count for the layer rules but not for cycles (they never run).

The rules:

- nothing imports `finesmith.cli` (only `finesmith/__main__.py` may, were there one);
- the bottom layer (`finesmith.core.*`, `finesmith.errors`, `finesmith.run`) imports only
  `finesmith.core.*` and `finesmith.errors`;
- `finesmith.data.*` imports nothing from the stages above it (model, train, evaluate,
  export, serve, domain, advise, pipeline, demo). The cache folder the data cache and the
  model loader share lives in `finesmith.core.paths`, and `finesmith data check` is handed
  its tokenizer by the command line, so data needs no exception for loading tokenizers;
- `finesmith.pipeline` (the table of contents that runs a training run) is imported only by
  the commands and runners above it: `cli`, `demo`, `domain.stages` (a staged run is a
  sequence of training runs), `evaluate.compare` (evaluates each approach the way `finesmith
  eval` does), `advise.measure` (calibrates the advisor with a short real run) and
  `serve.worker` (runs one fine-tuning job of the jobs API); the last four import it inside
  functions;
- what the bottom layer provides (`console`, `quiet_libraries`, `pick_device`,
  `stop_token_ids`) is imported from `finesmith.core`, not through a module that re-exports it;
- module-level imports have no cycles. A function-level import may break a cycle on
  purpose; `test_lazy_imports_that_break_cycles_are_known` lists the ones that do.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "finesmith"

BOTTOM = ("finesmith.core", "finesmith.errors", "finesmith.run")
BOTTOM_MAY_IMPORT = ("finesmith.core", "finesmith.errors")
ABOVE_DATA = tuple(f"finesmith.{name}" for name in
                   ("model", "train", "evaluate", "export", "serve", "domain", "advise", "pipeline", "demo"))
PIPELINE_IMPORTERS = {"finesmith.cli", "finesmith.demo", "finesmith.domain.stages", "finesmith.evaluate.compare",
                      "finesmith.advise.measure", "finesmith.serve.worker"}
CORE_NAMES = {"console": "finesmith.core.console", "quiet_libraries": "finesmith.core.console",
              "pick_device": "finesmith.core.device", "stop_token_ids": "finesmith.core.templates"}
# Function-level imports that would close a cycle if they moved to module level, and why
# each is imported late. A new entry is a new upward dependency: avoid it if you can.
CYCLE_BREAKING_LAZY_IMPORTS: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class Import:
    importer: str
    target: str  # a finesmith module
    names: tuple[str, ...]  # the names of a `from target import ...`
    lazy: bool  # inside a function
    type_only: bool  # under `if TYPE_CHECKING:`
    line: int

    def __str__(self) -> str:
        where = " (in a function)" if self.lazy else ""
        return f"{self.importer}:{self.line} imports {self.target}{where}"


def module_files() -> dict[str, Path]:
    files = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


MODULES = module_files()


def _imports_of(module: str, path: Path) -> list[Import]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, lazy: bool, type_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, True, type_only)
                continue
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                visit(child, lazy, True)
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    found.append(Import(module, alias.name, (), lazy, type_only, child.lineno))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[:len(package.split(".")) - child.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                names = tuple(alias.name for alias in child.names)
                found.append(Import(module, base, names, lazy, type_only, child.lineno))
                # `from finesmith.data import pii` imports the submodule itself.
                found.extend(Import(module, f"{base}.{name}", (), lazy, type_only, child.lineno)
                             for name in names if f"{base}.{name}" in MODULES)
            visit(child, lazy, type_only)

    visit(ast.parse(path.read_text(encoding="utf-8"), str(path)), False, False)
    return [i for i in found if i.target == PACKAGE or i.target.startswith(PACKAGE + ".")]


IMPORTS = [i for module, path in MODULES.items() for i in _imports_of(module, path)]


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _ancestors(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:n]) for n in range(1, len(parts))]


def module_graph(include_lazy: bool = False) -> dict[str, set[str]]:
    """Module -> the finesmith modules it imports (module level only, unless `include_lazy`).

    Importing `a.b.c` runs the `__init__` of `a` and `a.b` first, so those count too.
    """
    graph: dict[str, set[str]] = {module: set() for module in MODULES}
    for i in IMPORTS:
        if i.type_only or (i.lazy and not include_lazy) or i.target not in MODULES:
            continue
        graph[i.importer].update(m for m in [*_ancestors(i.target), i.target] if m != i.importer)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in sorted(graph[node]):
            if other not in index:
                connect(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def _reaches(graph: dict[str, set[str]], start: str, goal: str) -> bool:
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        if node == goal:
            return True
        if node not in seen:
            seen.add(node)
            todo.extend(graph[node])
    return False


def test_the_import_reader_sees_module_and_function_level_imports():
    edges = {(i.importer, i.target, i.lazy) for i in IMPORTS}
    assert ("finesmith.pipeline", "finesmith.config", False) in edges
    assert ("finesmith.evaluate.compare", "finesmith.pipeline", True) in edges
    assert len(MODULES) > 50


def test_nothing_imports_the_command_line():
    offenders = [str(i) for i in IMPORTS if _within(i.target, ("finesmith.cli",))
                 and i.importer != "finesmith.__main__"]
    assert not offenders, "\n".join(offenders)


def test_the_bottom_layer_imports_only_the_bottom_layer():
    offenders = [str(i) for i in IMPORTS if _within(i.importer, BOTTOM)
                 and not _within(i.target, BOTTOM_MAY_IMPORT) and i.target != PACKAGE]
    assert not offenders, "\n".join(offenders)


def test_data_imports_no_stage_above_it():
    offenders = [str(i) for i in IMPORTS if _within(i.importer, ("finesmith.data",)) and _within(i.target, ABOVE_DATA)]
    assert not offenders, "\n".join(offenders)


def test_only_commands_and_runners_import_the_pipeline():
    offenders = [str(i) for i in IMPORTS if _within(i.target, ("finesmith.pipeline",))
                 and i.importer not in PIPELINE_IMPORTERS]
    assert not offenders, "\n".join(offenders)


def test_core_names_come_from_core():
    offenders = [f"{i}: import {name} from {CORE_NAMES[name]}" for i in IMPORTS for name in i.names
                 if name in CORE_NAMES and not _within(i.target, ("finesmith.core",))]
    assert not offenders, "\n".join(offenders)


def test_module_level_imports_have_no_cycles():
    found = cycles(module_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_lazy_imports_that_break_cycles_are_known():
    """A function-level import that would close a cycle at module level is a deliberate exception."""
    eager = module_graph()
    breaking = {(i.importer, i.target) for i in IMPORTS
                if i.lazy and not i.type_only and i.target in MODULES and i.target not in eager[i.importer]
                and _reaches(eager, i.target, i.importer)}
    unknown = sorted(breaking - CYCLE_BREAKING_LAZY_IMPORTS)
    assert not unknown, "new function-level imports that break a cycle: " + ", ".join(f"{a} -> {b}" for a, b in unknown)


@pytest.mark.parametrize("importer,target", sorted(CYCLE_BREAKING_LAZY_IMPORTS))
def test_known_cycle_breaking_imports_still_exist(importer, target):
    assert any(i.importer == importer and i.target == target and i.lazy for i in IMPORTS), (
        f"{importer} no longer imports {target} in a function; remove it from CYCLE_BREAKING_LAZY_IMPORTS")
