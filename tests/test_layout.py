"""The package's shape: modules import in pipeline-stage order with no cycle, no module or function is too long to
read, every import inside a function says why it is there, and every module has a test file named after it.

Stages (base → data → models → train → tracking → results → sweep → export → api → cli): a module may import from its
own stage or an earlier one, never a later one; pure compute (data, models, train) never imports ray or mlflow, and
the MLflow glue, the results and export never import ray.

An import inside a function is the exception: it carries ``# deferred: <reason>`` on its line, or on a comment line
right above it (which covers the imports that follow it directly), with a reason from :data:`DEFERRED_REASONS`.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lasegseg"
STAGES = ["base", "data", "models", "train", "tracking", "results", "sweep", "export", "api", "cli"]
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 450
TESTS = Path(__file__).resolve().parent
DEFERRED_REASONS = {
    "heavy": "a heavy optional dependency (torch, monai, transformers, mlflow, ray, …) kept off a path that does not "
    "need it",
    "start-up": "a start-up cost measured in bench (the CLI, a Ray worker)",
    "cycle": "an import cycle with a third-party package",
}
_DEFERRED = re.compile(r"#\s*deferred:\s*([a-z-]+)")
NO_RAY_STAGES = ("tracking", "results", "export")


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
    if _stage(module) in NO_RAY_STAGES:
        assert "ray" not in _third_party(path), f"{module} ({_stage(module)}) imports ray"


def test_reading_results_back_loads_no_ray():
    """The results stage and export, with everything they import, run where Ray is not installed or not wanted."""
    modules = [m for m in sorted(_all_modules()) if _stage(m) in NO_RAY_STAGES]
    code = f"import sys; import {', '.join(modules)}; print(sorted(m for m in sys.modules if m.split('.')[0] == 'ray'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert modules and out == "[]", f"importing {modules} loaded {out}"


def test_modules_are_short_enough_to_read():
    long = {
        str(p.relative_to(PACKAGE.parent)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def _deferred_imports(path: Path) -> list[tuple[int, str]]:
    """(line, reason or '') of every import statement inside a function of ``path``."""
    lines = path.read_text().splitlines()
    found = set()
    for func in ast.walk(ast.parse("\n".join(lines))):
        if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        blocks = (getattr(node, f, None) for node in ast.walk(func) for f in ("body", "orelse", "finalbody"))
        for block in (b for b in blocks if isinstance(b, list)):
            run_reason = ""
            for prev, stmt in zip([None, *block], block, strict=False):
                if not isinstance(stmt, (ast.Import, ast.ImportFrom)):
                    continue
                if not isinstance(prev, (ast.Import, ast.ImportFrom)):  # a run of imports starts: its comment above
                    above = lines[stmt.lineno - 2].strip() if stmt.lineno > 1 else ""
                    run_reason = _tag(above) if above.startswith("#") else ""
                own = next((t for t in map(_tag, lines[stmt.lineno - 1 : stmt.end_lineno]) if t), "")
                found.add((stmt.lineno, own or run_reason))
    return sorted(found)


def _tag(line: str) -> str:
    match = _DEFERRED.search(line)
    return match.group(1) if match else ""


def test_imports_inside_functions_say_why():
    unexplained = [
        f"{path.relative_to(PACKAGE.parent)}:{line} ({reason or 'no # deferred: reason'})"
        for path in sorted(PACKAGE.rglob("*.py"))
        for line, reason in _deferred_imports(path)
        if reason not in DEFERRED_REASONS
    ]
    assert not unexplained, (
        f"imports inside functions without one of the reasons {sorted(DEFERRED_REASONS)}:\n" + "\n".join(unexplained)
    )


def _test_file(module: str) -> Path:
    parts = module.split(".")[1:]
    return TESTS.joinpath(*parts[:-1], f"test_{parts[-1]}.py")


def test_every_module_has_a_test_file_named_after_it():
    missing = [
        str(_test_file(m).relative_to(TESTS.parent))
        for m, p in sorted(_all_modules().items())
        if p.name != "__init__.py" and not _test_file(m).is_file()
    ]
    assert not missing, "modules without their test file: " + ", ".join(missing)


def test_every_package_says_what_lives_where():
    bare = [
        str(p.relative_to(PACKAGE.parent))
        for p in PACKAGE.rglob("__init__.py")
        if ast.get_docstring(ast.parse(p.read_text())) is None
    ]
    assert not bare, f"package __init__ without a docstring: {bare}"


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
