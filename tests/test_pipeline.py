"""End-to-end: the real `dvc` commands on generated data in a temporary git repo."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow


def run(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1",
           # the stages' `python` must be this interpreter, as `make` arranges
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def dvc(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run(cwd, sys.executable, "-m", "dvc", *args, check=check)


def init_repo(project: Path, tarball: tuple[Path, str], edit=None) -> Path:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["download"].update(url=tarball[0].as_uri(), md5=tarball[1])
    if edit:
        edit(params)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(project, "git", "init", "-q")
    run(project, "git", "config", "user.email", "test@example.com")
    run(project, "git", "config", "user.name", "test")
    dvc(project, "init", "-q")
    run(project, "git", "add", "-A")
    run(project, "git", "commit", "-qm", "init")
    return project


def test_dvc_repro_preprocess_builds_the_image_folder_once(project: Path, tarball) -> None:
    repo = init_repo(project, tarball)
    dvc(repo, "repro", "preprocess")
    images = repo / "data" / "images"
    assert sorted(p.name for p in images.iterdir()) == [
        "classes.json", "normalization.json", "test", "test.csv", "train", "train.csv", "val", "val.csv"]
    assert len(list(images.glob("*/*/*.png"))) == 120
    assert (repo / "dvc.lock").exists()
    again = dvc(repo, "repro", "preprocess")
    assert "didn't change" in again.stdout and "Running stage" not in again.stdout
    assert dvc(repo, "status", "-q", "preprocess", check=False).returncode == 0
