"""dvc.yaml lists, for every stage, exactly the project modules it runs: its own and every
`stages` module it imports, directly or not. A module left out would let DVC call a stage up
to date while its code changed."""
from __future__ import annotations

import ast
from pathlib import Path

import yaml

from stages.lib.archs import registry
from tests.conftest import ROOT


def imported_names(path: Path) -> list[str]:
    """Every module name `path` imports anywhere in it (function-level imports too), and for
    `from m import n` also `m.n`, which may be a module."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
    return names


def stage_imports(module: str, found: set[str] | None = None) -> set[str]:
    """`module` and the project modules it imports, transitively, as paths like stages/x.py."""
    found = found if found is not None else set()
    path = f"{module.replace('.', '/')}.py"
    if path in found or not (ROOT / path).exists():
        return found
    found.add(path)
    for name in imported_names(ROOT / path):
        if name.startswith("stages."):
            stage_imports(name, found)
    if path == "stages/lib/nets.py":  # build_model imports the registered architectures' modules
        for target in registry().values():
            stage_imports(target.target.split(":")[0], found)
    return found


def test_every_stage_depends_on_exactly_the_modules_it_imports() -> None:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        module = stage["cmd"].split()[2]  # python -m stages.<name> ...
        declared = {d for d in stage["deps"] if isinstance(d, str) and d.startswith("stages/")}
        assert declared == stage_imports(module), name


def test_the_import_walk_follows_imports_through_modules() -> None:
    assert stage_imports("stages.train") >= {"stages/train.py", "stages/lib/harness.py", "stages/lib/loop.py",
                                             "stages/lib/devices.py", "stages/lib/outputs.py"}
    assert stage_imports("stages.extract") == {"stages/extract.py", "stages/lib/datasets.py",
                                               "stages/lib/outputs.py", "stages/lib/params.py",
                                               "stages/lib/archs.py"}
    # the ResNets' module, which the architecture registry names as a string
    assert "stages/lib/resnets.py" in stage_imports("stages.train")
