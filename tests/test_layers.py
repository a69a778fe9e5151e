"""The code's layers hold: the import-linter contracts in pyproject.toml, and no circle of imports."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import grimp

from testkit.helpers import PROJECT_ROOT

PACKAGES = ("benchmarks", "common", "controller", "deploy", "door", "patch", "testkit", "workers")


def test_every_import_runs_down_the_layers() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), "--no-cache"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120,
                            env={"PYTHONPATH": str(PROJECT_ROOT), "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "Contracts: 3 kept, 0 broken." in result.stdout


def _circles(imports: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    circles: list[list[str]] = []
    for root in imports:
        if root in index:
            continue
        work = [(root, iter(sorted(imports[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            module, targets = work[-1]
            for target in targets:
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(sorted(imports.get(target, ())))))
                    break
                if target in on_stack:
                    low[module] = min(low[module], index[target])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[module])
                if low[module] == index[module]:
                    group = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.append(member)
                        if member == module:
                            break
                    if len(group) > 1:
                        circles.append(sorted(group))
    return circles


def test_no_two_modules_import_each_other_even_through_others() -> None:
    graph = grimp.build_graph(*PACKAGES)
    modules = {m for m in graph.modules if m.split(".")[0] in PACKAGES}
    imports = {m: {t for t in graph.find_modules_directly_imported_by(m) if t in modules} for m in modules}
    # a package's __init__ importing nothing is not a circle; only module-to-module arrows count
    assert _circles(imports) == []


def test_the_circle_finder_finds_a_circle() -> None:
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


# Small modules with one job: the product's files and functions stay short enough to read
# at once.
MAX_FILE_LINES = 450
MAX_FUNCTION_LINES = 60
PRODUCT = ("common", "controller", "deploy", "door", "patch", "workers")


def test_product_files_and_functions_stay_short() -> None:
    too_long = []
    for package in PRODUCT:
        for path in sorted((PROJECT_ROOT / package).rglob("*.py")):
            source = path.read_text()
            if len(source.splitlines()) > MAX_FILE_LINES:
                too_long.append(f"{path.relative_to(PROJECT_ROOT)}: {len(source.splitlines())} lines")
            for node in ast.walk(ast.parse(source)):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    length = (node.end_lineno or node.lineno) - node.lineno + 1
                    if length > MAX_FUNCTION_LINES:
                        too_long.append(f"{path.relative_to(PROJECT_ROOT)}:{node.lineno} {node.name}: {length} lines")
    assert too_long == []
