"""The code's shape, held: short functions with few parameters in stages/, and no import
circle between the project's modules."""
from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT
from tests.test_dvc_deps import imported_names

MAX_LINES, MAX_PARAMS = 40, 6


def functions(package: str) -> list[tuple[str, ast.FunctionDef]]:
    return [(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}", node)
            for path in sorted((ROOT / package).rglob("*.py"))
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]


def parameter_count(node: ast.FunctionDef) -> int:
    a = node.args
    count = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) + bool(a.vararg) + bool(a.kwarg)
    return count - bool(a.args and a.args[0].arg in ("self", "cls"))


def test_no_stage_function_is_over_40_lines_or_6_parameters() -> None:
    long = [name for name, node in functions("stages") if node.end_lineno - node.lineno + 1 > MAX_LINES]
    wide = [name for name, node in functions("stages") if parameter_count(node) > MAX_PARAMS]
    assert long == [] and wide == []


def module_imports(path: Path) -> set[str]:
    """The project modules `path` imports anywhere in it."""
    return {n for n in imported_names(path) if (ROOT / f"{n.replace('.', '/')}.py").exists()}


def test_no_import_circle_between_the_projects_modules() -> None:
    graph = {".".join(p.relative_to(ROOT).with_suffix("").parts): module_imports(p)
             for package in ("stages", "bench") for p in (ROOT / package).rglob("*.py")}
    circles = []

    def visit(module: str, path: list[str]) -> None:
        for target in sorted(graph.get(module, ())):
            if target in path:
                circles.append(path[path.index(target):] + [target])
            elif target not in done:
                visit(target, path + [target])
        done.add(module)

    done: set[str] = set()
    for module in sorted(graph):
        visit(module, [module])
    assert circles == []
