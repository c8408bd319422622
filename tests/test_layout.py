"""The package's shape: modules import in pipeline-stage order with no cycle, and no function is too long to read.

Stages (base → data → models → train → tracking → results → sweep → export → api → cli): a module may import from its
own stage or an earlier one, never a later one; pure compute (data, models, train) never imports ray or mlflow.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lasegseg"
STAGES = ["base", "data", "models", "train", "tracking", "results", "sweep", "export", "api", "cli"]
MAX_FUNCTION_LINES = 80


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _stage(module: str) -> str:
    parts = module.split(".")
    if len(parts) < 2:
        return "base"
    return parts[1] if parts[1] in STAGES else "base"


def _imports(path: Path) -> set[str]:
    """Every lasegseg module this file imports, at any depth (function-level imports too)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("lasegseg"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lasegseg"):
            for alias in node.names:  # `from lasegseg.sweep import tracking` imports the submodule
                sub = f"{node.module}.{alias.name}"
                out.add(sub if (PACKAGE.parent / sub.replace(".", "/")).with_suffix(".py").is_file() else node.module)
    return out


def _all_modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _third_party(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("module", sorted(_all_modules()))
def test_imports_follow_the_stage_order(module):
    path = _all_modules()[module]
    if module == "lasegseg":
        return  # the package's lazy `load_model` attribute points at the api
    rank = STAGES.index(_stage(module))
    later = sorted(m for m in _imports(path) if STAGES.index(_stage(m)) > rank)
    assert not later, f"{module} ({_stage(module)}) imports later stages: {later}"
    if _stage(module) in ("base", "data", "models", "train"):
        assert not _third_party(path) & {"ray", "mlflow"}, f"{module} is pure compute but imports ray or mlflow"


def test_no_import_cycle():
    modules = _all_modules()
    graph = {m: {i for i in _imports(p) if i in modules and i != m} for m, p in modules.items() if m != "lasegseg"}
    done: set[str] = set()

    def visit(node: str, stack: list[str]) -> None:
        if node in stack:
            pytest.fail("import cycle: " + " -> ".join([*stack[stack.index(node) :], node]))
        if node in done:
            return
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, [*stack, node])
        done.add(node)

    for module in sorted(graph):
        visit(module, [])


def test_functions_are_short_enough_to_read():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "functions longer than 80 lines:\n" + "\n".join(long)
