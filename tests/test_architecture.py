"""The package's shape, checked from its source: no import cycle, the registry a leaf, function-level imports
of sibling modules only where they keep torch or gymnasium out of a process (and say so), short functions."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mugato_ray"
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
MAX_FUNCTION_LINES = 60


def _sibling(node: ast.AST) -> list[str]:
    """Sibling modules that an import statement imports."""
    if isinstance(node, ast.ImportFrom) and node.module == "mugato_ray":
        return [a.name for a in node.names if a.name in MODULES]
    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mugato_ray."):
        return [node.module.split(".")[1]]
    if isinstance(node, ast.Import):
        return [a.name.split(".")[1] for a in node.names if a.name.startswith("mugato_ray.")]
    return []


def _tree(module: str) -> ast.Module:
    return ast.parse((PACKAGE / f"{module}.py").read_text())


def module_imports(module: str) -> set[str]:
    """Siblings imported at module level (``if TYPE_CHECKING:`` blocks excluded: they never run)."""
    return {m for node in _tree(module).body if not isinstance(node, ast.If) for m in _sibling(node)}


def test_module_level_imports_have_no_cycle():
    graph = {m: module_imports(m) for m in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            assert state.get(d) != 1, f"import cycle: {' -> '.join(path[path.index(d):] + [d])}"
            if d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in MODULES:
        if m not in state:
            visit(m, [m])


def test_the_registry_imports_nothing_of_the_package():
    assert module_imports("tasks") == set()


def test_function_level_sibling_imports_say_why():
    """A sibling imported inside a function is there to keep torch or gymnasium out of processes that do not
    need them; the function says so in a comment containing "lazy" before that import."""
    unexplained = []
    for m in MODULES:
        lines = (PACKAGE / f"{m}.py").read_text().splitlines()
        for fn in ast.walk(_tree(m)):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            inner = [n for n in ast.walk(fn) if _sibling(n)]
            if inner:
                first = min(n.lineno for n in inner)
                if not any("lazy" in line.lower() and "#" in line for line in lines[fn.lineno - 1: first]):
                    unexplained.append(f"{m}.{fn.name} (line {first})")
    assert not unexplained, f"function-level imports without a '# lazy: why' comment: {unexplained}"


def test_no_function_is_longer_than_the_limit():
    long = []
    for m in MODULES:
        for fn in ast.walk(_tree(m)):
            if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                n = fn.end_lineno - fn.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{m}.{fn.name}: {n} lines")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


@pytest.mark.parametrize(("module", "absent"), [
    ("mugato_ray.data", ("torch", "gymnasium")),  # tokenize actors
    ("mugato_ray.train", ("gymnasium",)),  # training workers
    ("mugato_ray.evaluate", ("torch",)),  # the evaluation driver: only its actors load the model
    ("mugato_ray.tasks", ("torch", "gymnasium", "ray")),
])
def test_processes_import_only_what_they_need(module, absent):
    code = f"import sys, {module}; print(sorted(m for m in {absent!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"importing {module} loads {out.strip()}"
