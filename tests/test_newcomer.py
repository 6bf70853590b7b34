"""A newcomer's first hour, offline: the README's first-screen commands, as written, on a fresh
clone of the project with generated MNIST files standing in for ../shared/data."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from stages.lib.params import load_params
from tests.conftest import copy_project
from tests.idx_format import idx_payloads, write_idx_files
from tests.test_pipeline import committed, dvc, readme_outputs, run

pytestmark = pytest.mark.slow

CLONED = ("stages", "presets", "dvc.yaml", "params.yaml", "Makefile", ".gitignore", "pyproject.toml",
          "requirements.lock", "README.md")


def clone(dest: Path) -> Path:
    """The project's tracked files a run needs, committed in a new git and DVC repo."""
    return committed(copy_project(dest, CLONED))


def make(repo: Path, *args: str) -> str:
    """`make ARGS` with this interpreter's venv as the project's (already set up: the stamp is
    newer than the files it depends on, so nothing is installed)."""
    stamp = repo / ".dvc" / "tmp" / "installed"
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.touch()
    venv = Path(sys.executable).parent.parent
    return run(repo, "make", *args, f"VENV={venv}", f"STAMP={stamp}").stdout


def test_local_data_then_make_repro_then_a_tutorial_as_the_readme_says(tmp_path, monkeypatch) -> None:
    shared = tmp_path / "shared" / "data"
    write_idx_files(shared / "mnist", idx_payloads(train_per_class=6, test_per_class=2))
    repo = clone(tmp_path / "project")
    readme = (repo / "README.md").read_text()
    assert "make local-data DATASET=mnist" in readme and "make repro" in readme

    make(repo, "local-data", "DATASET=mnist", f"SHARED_DATA={shared}")
    text = (repo / "params.yaml").read_text()
    assert str(tmp_path) not in text  # no folder of this machine in a tracked file
    download = yaml.safe_load(text)["download"]
    assert (download["dataset"], download["url"]) == ("mnist", "data/local/mnist/")
    monkeypatch.chdir(repo)
    assert load_params().download.md5 == download["md5"]  # well formed: it loads and checks
    assert run(repo, "git", "status", "--short").stdout.split() == ["M", "params.yaml"]

    # `make repro`, with params.yaml changed and nothing committed, leaves what the README says
    # (the default recipe: on 54 training images, a step an epoch)
    make(repo, "repro")
    assert [p for p in readme_outputs() if not (repo / p).exists()] == []
    evaluation = json.loads((repo / "metrics" / "eval" / "train.json").read_text())
    assert set(evaluation) == {"accuracy", "loss", "macro_f1"}  # digits: no flip TTA

    # a tutorial, still with nothing committed: the preset keeps the local copy
    make(repo, "tutorial-mnist_mlp")
    shown = json.loads(dvc(repo, "exp", "show", "--json").stdout)
    runs = {r["name"]: r for rev in shown for e in (rev.get("experiments") or []) for r in e["revs"]}
    tutorial = runs["mnist_mlp"]["data"]
    assert tutorial["params"]["params.yaml"]["data"]["train"]["arch"] == "mnist_mlp"
    assert tutorial["params"]["params.yaml"]["data"]["download"]["url"] == "data/local/mnist/"
    assert 0 <= tutorial["metrics"]["metrics/eval/finetune.json"]["data"]["accuracy"] <= 1
