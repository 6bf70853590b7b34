"""The pinned installs: requirements.lock pins what pyproject.toml asks for, and this
environment (built by `make setup`) is the lock's."""
from __future__ import annotations

import re
import sysconfig
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.conftest import ROOT

PROJECT = "cifar-pipeline"
UNPINNED = {"pip", "setuptools", "wheel"}  # pip freeze leaves the installers out


def pins() -> dict[str, Version]:
    found = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            match = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)", line)
            assert match, f"requirements.lock: not a name==version pin: {line!r}"
            found[canonicalize_name(match[1])] = Version(match[2])
    return found


def test_lock_pins_every_dependency_within_pyproject_ranges() -> None:
    # pyproject.toml's dependencies and test extra, as the installed project's metadata has them
    wanted = [Requirement(r) for r in metadata.requires(PROJECT)]
    pinned = pins()
    for requirement in wanted:
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{name} is in pyproject.toml but not pinned: run `make lock`"
        assert requirement.specifier.contains(pinned[name]), \
            f"{name}=={pinned[name]} is outside pyproject.toml's {requirement}: run `make lock`"


def test_this_environment_is_the_locked_one() -> None:
    pinned = pins()
    # the environment's own packages, as pip freeze lists them: not what an import added to
    # sys.path (setuptools puts its vendored packages there)
    site = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    installed = {canonicalize_name(d.metadata["Name"]): Version(d.version)
                 for d in metadata.distributions(path=site)}
    installed = {n: v for n, v in installed.items() if n not in UNPINNED and n != PROJECT}
    missing = sorted(set(installed) - set(pinned))
    assert not missing, f"installed but not in requirements.lock: {missing}; run `make lock`"
    # A CPU build from PyTorch's index (2.14.1+cpu) is the pinned 2.14.1: compare public versions
    drifted = {n: f"{v} (lock {pinned[n]})" for n, v in installed.items() if Version(v.public) != pinned[n]}
    assert not drifted, f"not the locked versions: {drifted}; run `make setup` on a fresh .venv"
