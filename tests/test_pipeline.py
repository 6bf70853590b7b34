"""End-to-end: the real `dvc` commands on generated data in a temporary git repo."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, copy_repo

pytestmark = pytest.mark.slow


# The README's `dvc exp show` options for a readable experiments table.
EXP_TABLE = ("--only-changed", "--drop", ".*(seconds|per_second|loss|models/|Created).*",
             "--sort-by", "metrics/eval/finetune.json:accuracy_tta_flip_shift", "--sort-order", "desc")


def dvc_env(**extra: str) -> dict[str, str]:
    """The environment of a `dvc` subprocess: the stages' `python` must be this interpreter,
    as `make` arranges."""
    return {**os.environ, "DVC_NO_ANALYTICS": "1",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **extra}


def run(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=dvc_env(), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def dvc(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run(cwd, sys.executable, "-m", "dvc", *args, check=check)


def git(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return run(cwd, "git", *args)


def shrink(params: dict) -> None:
    """The project's own params, cut down to seconds on 120 tiny images."""
    params["train"].update(epochs=2.0, batch_size=30, eval_batch_size=50)
    params["finetune"].update(epochs=2.0, batch_size=30, freeze_epochs=1)
    params["evaluate"].update(batch_size=50, misclassified=8)


def init_repo(project: Path, tarball: tuple[Path, str]) -> Path:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["download"].update(url=tarball[0].as_uri(), md5=tarball[1])
    shrink(params)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return committed(project)


def committed(project: Path) -> Path:
    """`project` as a new git and DVC repo with everything in it committed."""
    git(project, "init", "-q")
    git(project, "config", "user.email", "test@example.com")
    git(project, "config", "user.name", "test")
    dvc(project, "init", "-q")
    shutil.copy(ROOT / ".dvc" / "config", project / ".dvc" / "config")  # the project's cache type
    shutil.copytree(ROOT / ".dvc" / "plots", project / ".dvc" / "plots")  # its plot templates
    git(project, "add", "-A")
    git(project, "commit", "-qm", "init")
    return project


def set_param(repo: Path, section: str, key: str, value: object) -> None:
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params[section][key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def test_dvc_repro_preprocess_builds_the_image_folder_once(project: Path, tarball) -> None:
    repo = init_repo(project, tarball)
    dvc(repo, "repro", "preprocess")
    images = repo / "data" / "images"
    assert sorted(p.name for p in images.iterdir()) == [
        "classes.json", "normalization.json", "test", "test.csv", "train", "train.csv", "val", "val.csv"]
    assert len(list(images.glob("*/*/*.png"))) == 120
    assert sorted(p.name for p in (repo / "data" / "packed").iterdir()) == [
        "classes.json", "normalization.json", "test-labels.npy", "test.npy", "train-labels.npy",
        "train.npy", "val-labels.npy", "val.npy"]
    again = dvc(repo, "repro", "preprocess")
    assert "didn't change" in again.stdout and "Running stage" not in again.stdout
    assert dvc(repo, "status", "-q", "preprocess", check=False).returncode == 0


def readme_outputs() -> list[str]:
    """The paths the README's "What you get" says `make repro` leaves ({a,b} expanded)."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## What you get"):text.index("How long and how accurate")]
    paths = []
    for quoted in re.findall(r"`([a-z]+/[^`]*)`", section):
        if quoted.split("/")[0] not in ("data", "models", "metrics", "plots", "dvclive"):
            continue
        head, braces, tail = re.match(r"([^{]*)(?:\{([^}]*)\})?(.*)", quoted).groups()
        paths += [f"{head}{choice}{tail}" for choice in (braces.split(",") if braces else [""])]
    return paths


def test_full_pipeline_experiments_metrics_and_plots(pipeline_run, tmp_path: Path, monkeypatch) -> None:
    repo, first = copy_repo(pipeline_run[0], tmp_path / "repo"), pipeline_run[1]  # `dvc repro`, committed
    for stage in ("download", "extract", "preprocess", "train", "finetune", "export", "evaluate"):
        assert f"Running stage '{stage}'" in first
    for name in ("train", "finetune"):
        assert (repo / "models" / name / "model.pt").is_file()
        sidecar = json.loads((repo / "models" / name / "model.json").read_text())
        assert sidecar["arch"] == "airbench" and len(sidecar["classes"]) == 10
        evaluation = json.loads((repo / "metrics" / "eval" / f"{name}.json").read_text())
        assert 0 <= evaluation["accuracy"] <= 1 and "accuracy_tta_flip" in evaluation
    assert (repo / "models" / "export" / "model.pt2").is_file()
    report = json.loads((repo / "metrics" / "finetune.json").read_text())["init_report"]
    assert report["reinitialised"] == [] and "head.weight" in report["loaded"]
    promised = readme_outputs()
    assert len(promised) >= 10 and [p for p in promised if not (repo / p).exists()] == []

    again = dvc(repo, "repro")
    assert "Running stage" not in again.stdout
    assert dvc(repo, "status", "-q", check=False).returncode == 0
    assert git(repo, "status", "--porcelain").stdout == ""  # the rerun left the commit as it was
    fetch_a_registered_model(repo)

    # An experiment with another learning rate, for one epoch, is listed with its metrics.
    dvc(repo, "exp", "run", "-n", "low-lr", "-S", "train.lr=0.05", "-S", "train.epochs=1")
    shown = json.loads(dvc(repo, "exp", "show", "--json").stdout)
    experiments = [r for rev in shown for e in (rev.get("experiments") or []) for r in e["revs"]]
    low = next(r for r in experiments if r["name"] == "low-lr")
    assert low["data"]["params"]["params.yaml"]["data"]["train"]["lr"] == 0.05
    assert "accuracy" in low["data"]["metrics"]["metrics/eval/train.json"]["data"]

    # DVC's run cache: a repeated experiment, from the committed workspace, is restored, not
    # run. And a forced rerun trains afresh: the finished run's checkpoint is gone, so there is
    # nothing to resume.
    git(repo, "checkout", "--", ".")
    dvc(repo, "checkout", "-q")
    repeated = dvc(repo, "exp", "run", "-S", "train.lr=0.05", "-S", "train.epochs=1")  # low-lr's params
    for stage in ("train", "finetune", "export", "evaluate"):
        assert f"Stage '{stage}' is cached - skipping run, checking out outputs" in repeated.stdout
    assert "Running stage" not in repeated.stdout
    # a plain `dvc exp show` on a 200-column terminal: the test accuracy is the first metric
    monkeypatch.setenv("COLUMNS", "200")
    plain = dvc(repo, "exp", "show", "--no-pager").stdout
    assert "metrics/eval/finetune.json:accuracy" in plain.splitlines()[1]
    assert not (repo / "checkpoints").exists() or not list((repo / "checkpoints").iterdir())
    forced = dvc(repo, "repro", "-f", "train")
    assert "Running stage 'train'" in forced.stdout and "resuming" not in forced.stdout

    # Another architecture (with learning rates that suit it) runs through finetune, which
    # reads it from models/train/model.json: finetune.arch stays null. The train section is
    # the training stages' own: the data stages stay as they are.
    lenet = dvc(repo, "exp", "run", "-n", "lenet", "-S", "train.arch=lenet", "-S", "train.optimizer=adam",
                "-S", "train.progressive_from=0", "-S", "train.seed=1",
                "-S", "train.lr=0.003", "-S", "finetune.lr=0.003", "-S", "finetune.head_lr=0.003")
    for stage in ("download", "extract", "preprocess"):
        assert f"Running stage '{stage}'" not in lenet.stdout
    for stage in ("train", "finetune", "evaluate"):
        assert f"Running stage '{stage}'" in lenet.stdout
    assert yaml.safe_load((repo / "params.yaml").read_text())["finetune"]["arch"] is None
    for name in ("train", "finetune"):
        assert json.loads((repo / "models" / name / "model.json").read_text())["arch"] == "lenet"

    # The README's table of the experiments: per-class figures and timings stay out of it.
    table = dvc(repo, "exp", "show", "--csv", *EXP_TABLE).stdout.splitlines()
    header = table[0].split(",")
    assert len(table) >= 1 + 3 and "metrics/eval/finetune.json:accuracy_tta_flip_shift" in header
    assert not [c for c in header if "seconds" in c or "accuracy_cat" in c or c.startswith("models/")]
    assert len(header) <= 26, header  # 8 params changed across the experiments, and train's epochs and steps

    # An experiment applied and committed shows in `dvc metrics diff` against the commit before.
    git(repo, "checkout", "--", ".")
    dvc(repo, "checkout", "-q")
    dvc(repo, "exp", "apply", "low-lr")
    assert dvc(repo, "status", "-q", check=False).returncode == 0  # its outputs, from the cache
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "low lr, one epoch")
    diff = json.loads(dvc(repo, "metrics", "diff", "HEAD~1", "--json").stdout)
    assert "old" in diff["metrics/train.json"]["epochs"]
    assert diff["metrics/train.json"]["epochs"]["new"] == 1.0
    # loss, not accuracy: on the toy set both runs can sit at the same chance-level accuracy,
    # which `metrics diff` then leaves out as unchanged
    assert "loss" in diff["metrics/eval/train.json"]

    rendered = json.loads(dvc(repo, "plots", "show", "--json").stdout)
    assert "errors" not in rendered, rendered["errors"]
    plots = rendered["data"]
    # titled in words (DVC takes no title for an image: those keep their path)
    assert all("/" not in name for name in plots if not name.endswith(".png")), list(plots)
    confusion = plots["Test confusion matrix, trained model"][0]["content"]["data"]["values"]
    classes = json.loads((repo / "data/images/classes.json").read_text())
    assert {row["actual"] for row in confusion} == {row["predicted"] for row in confusion} == set(classes)
    curve = plots["Loss per epoch (train and val; train, then finetune stage)"][0]["content"]
    steps = {row["filename"]: [] for row in curve["data"]["values"]}
    for row in curve["data"]["values"]:
        steps[row["filename"]].append(int(row["step"]))
    histogram = plots["Weight histograms per epoch, train stage (conv and linear layers)"][0]
    assert {row["epoch"] for row in histogram["content"]["data"]["values"]} == {1}
    # DVC names each line by its path less the common prefix (dvclive/)
    assert steps["train/plots/metrics/train/loss.tsv"] == [1]  # epochs counted from 1

    # DVC 3.67 refuses a plain typo itself; forced in with `+`, or as a bad value, DVC writes
    # it into params.yaml and the stage must refuse it.
    typo = dvc(repo, "exp", "run", "-S", "train.lrr=0.1", check=False)
    assert typo.returncode != 0 and "train.lrr" in typo.stderr
    for override, message in [("+train.lrr=0.1", "unknown key(s) ['train.lrr']"),
                              ("train.lr=abc", "train.lr must be a number, found 'abc'")]:
        refused = dvc(repo, "exp", "run", "-S", override, check=False)
        assert refused.returncode != 0
        assert message in refused.stdout + refused.stderr
        git(repo, "checkout", "--", "params.yaml")


def fetch_a_registered_model(repo: Path) -> None:
    """The model registry: dvc.yaml's artifacts, a version tagged with GTO, and `dvc artifacts
    get` by name from a clone that has no cache of its own, so the files come from the remote."""
    artifacts = yaml.safe_load((repo / "dvc.yaml").read_text())["artifacts"]
    assert {a["path"] for a in artifacts.values()} == {"models/train", "models/finetune", "models/export"}
    assert all(a["type"] == "model" and a["desc"] and a["labels"] for a in artifacts.values())
    dvc(repo, "remote", "add", "-d", "local", str(repo.parent / "remote"))
    git(repo, "commit", "-qam", "a DVC remote")
    dvc(repo, "push", "-q")
    run(repo, str(Path(sys.executable).parent / "gto"), "register", "cifar10-finetuned",
        "--version", "v1.0.0")
    clone = repo.parent / "clone"
    git(repo.parent, "clone", "-q", str(repo), str(clone))
    got = repo.parent / "got"
    dvc(repo.parent, "artifacts", "get", str(clone), "cifar10-finetuned", "--rev", "v1.0.0",
        "-o", str(got))
    for name in ("model.pt", "model.json"):
        assert (got / name).read_bytes() == (repo / "models" / "finetune" / name).read_bytes()
    assert not (clone / ".dvc" / "cache").exists()  # fetched from the remote, not a cache


def test_dvc_repro_after_sigkill_resumes_training(project: Path, tarball) -> None:
    repo = init_repo(project, tarball)
    set_param(repo, "train", "epochs", 4.0)
    dvc(repo, "repro", "preprocess")
    process = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "train"], cwd=repo,
                               env=dvc_env(PYTHONUNBUFFERED="1"),
                               text=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    for line in process.stdout:  # printed once the epoch's checkpoint is on disk
        if line.startswith("epoch 2/4"):
            os.killpg(process.pid, signal.SIGKILL)  # dvc and the stage it runs
            break
    process.wait()
    assert not (repo / "models" / "train").exists()
    rerun = dvc(repo, "repro", "train")
    assert "resuming after epoch 2" in rerun.stdout
    curve = (repo / "dvclive/train/plots/metrics/train/loss.tsv").read_text().splitlines()
    assert len(curve) == 5  # header + 4 epochs: the first two replayed from the checkpoint
    assert dvc(repo, "status", "-q", "train", check=False).returncode == 0
