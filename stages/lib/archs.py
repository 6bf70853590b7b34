"""The architectures `train.arch` may name. Each registers where its class is defined, in any
module of stages/lib/, with a mark that states what params must know of it:

    @architecture("lenet", blocks=("conv1.", "conv2.", "fc1.", "fc2."))
    class LeNet(Architecture): ...

Adding an architecture is that: a marked class, in one file. params refuses an unknown name, or
a recipe cut the architecture cannot take, before torch is imported (in one message with every
other problem, params.arch_problems), and the modules that define architectures import torch; so
`registry()` reads the marks from their source instead of importing them. The mark's arguments
must therefore be literals. nets.build_model imports only the module it needs."""
from __future__ import annotations

import ast
import functools
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, TypeVar

Class = TypeVar("Class", bound=type)
# folder -> the package its modules are in; tests add a temporary one
SEARCH: dict[Path, str] = {Path(__file__).parent: __package__ or "stages.lib"}


@dataclass(frozen=True)
class Arch:
    target: str  # "module:Class"
    any_size: bool = False  # trains on any image size from 16x16 up: progressive resizing needs it
    # the key prefixes of its blocks from the input on: progressive freezing stops them in turn
    blocks: tuple[str, ...] = ()


def architecture(name: str, any_size: bool = False,
                 blocks: tuple[str, ...] = ()) -> Callable[[Class], Class]:
    """Registers the class it marks as architecture `name` (the arguments as in Arch). It does
    nothing when the module runs: `registry()` reads it from the source."""
    return lambda cls: cls


def registry() -> dict[str, Arch]:
    """Every marked architecture under SEARCH's folders, by name."""
    return _scan(tuple(SEARCH.items()))


@functools.cache
def _scan(search: tuple[tuple[Path, str], ...]) -> dict[str, Arch]:
    found: dict[str, Arch] = {}
    for folder, package in search:
        for path in sorted(folder.glob("*.py")):
            text = path.read_text()
            if "@architecture(" in text:
                module = f"{package}.{path.stem}" if package else path.stem
                for name, arch in _marks(path, text, module):
                    if name in found:
                        raise ValueError(f"{path}: architecture {name!r} is registered twice "
                                         f"({found[name].target} and {arch.target}); rename one")
                    found[name] = arch
    return dict(sorted(found.items()))


def _marks(path: Path, text: str, module: str) -> list[tuple[str, Arch]]:
    """The (name, Arch) of each class in `path` marked @architecture(...)."""
    return [_read_mark(mark, path, f"{module}:{node.name}")
            for node in ast.walk(ast.parse(text, str(path))) if isinstance(node, ast.ClassDef)
            for mark in node.decorator_list
            if isinstance(mark, ast.Call) and getattr(mark.func, "id", None) == "architecture"]


def _read_mark(mark: ast.Call, path: Path, target: str) -> tuple[str, Arch]:
    """A mark's name and Arch, from its literal arguments."""
    try:
        name, *rest = [ast.literal_eval(arg) for arg in mark.args]
        arch = Arch(target, *rest, **{k.arg: ast.literal_eval(k.value) for k in mark.keywords})
        if not isinstance(name, str):
            raise TypeError(f"the name is {name!r}")
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path}:{mark.lineno}: @architecture takes a name and any_size, "
                         f"blocks, all literals ({err})") from None
    return name, replace(arch, blocks=tuple(arch.blocks))
