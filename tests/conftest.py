"""Shared fixtures: tiny data in the real CIFAR-10 format, and the project's params shrunk."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from stages.extract import extract
from stages.lib.card import ModelCard
from stages.lib.datasets import DATASETS
from stages.lib.params import PreprocessParams
from stages.preprocess import preprocess
from tests.cifar_format import batch_members, write_tarball

ROOT = Path(__file__).resolve().parents[1]
RGB_STATS = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


def model_card(arch: str, classes: list[str], normalization: dict | None = None,
               input_size: tuple[int, int] = (32, 32), tta: str = "flip_shift") -> ModelCard:
    """The model.json of a model saved by hand in a test (trained with train.tta `tta`)."""
    return ModelCard(arch=arch, classes=classes, normalization=normalization or RGB_STATS,
                     input_size=list(input_size), params={"tta": tta}, metrics={}, hardware={})


@pytest.fixture(scope="session")
def tarball(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A valid archive: 5 train batches and a test batch of 20 images each (2 per class)."""
    path = tmp_path_factory.mktemp("raw") / "cifar-10-python.tar.gz"
    md5 = write_tarball(path, batch_members())
    return path, md5


@pytest.fixture(scope="session")
def batches_dir(tarball: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("extracted") / "cifar-10-batches-py"
    extract(tarball[0].parent, out, DATASETS["cifar10"])
    return out


@pytest.fixture(scope="session")
def image_folder(batches_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("images") / "images"
    preprocess(batches_dir, out, PreprocessParams(val_fraction=0.1, seed=0, workers=2),
               DATASETS["cifar10"])
    return out


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of the project's pipeline files (no data, no venv) in a temporary directory."""
    return copy_project(tmp_path / "project")


def copy_project(dest: Path, names: tuple[str, ...] = ("stages", "dvc.yaml", "params.yaml")) -> Path:
    """The project's files `names` (by default what a pipeline run needs) copied into `dest`."""
    dest.mkdir(parents=True)
    for name in names:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, dest / name)
    return dest


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory: pytest.TempPathFactory, tarball) -> tuple[Path, str]:
    """The pipeline run once by `dvc repro` on the tarball and committed, with what the run
    printed; the end-to-end tests each work on a copy (copy_repo)."""
    from tests.test_pipeline import dvc, git, init_repo  # the end-to-end tests' helpers
    repo = init_repo(copy_project(tmp_path_factory.mktemp("pipeline") / "project"), tarball)
    printed = dvc(repo, "repro").stdout
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "baseline")
    return repo, printed


def copy_repo(repo: Path, dest: Path) -> Path:
    """A copy of a repo, its DVC cache included (DVC's state in .dvc/tmp left behind: it names
    the original's files)."""
    shutil.copytree(repo, dest, ignore=lambda folder, names: ["tmp"] if folder.endswith(".dvc") else [])
    return dest
