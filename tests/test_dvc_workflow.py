"""Beyond one run: a queued sweep and a round trip through a DVC remote, for real."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import copy_repo
from tests.test_pipeline import dvc, dvc_env

pytestmark = pytest.mark.slow
QUEUE_TIMEOUT_SECONDS = 600


def wait_for_queue(repo: Path) -> str:
    """Poll `dvc queue status` until nothing is queued or running; returns the last status."""
    deadline = time.monotonic() + QUEUE_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        status = dvc(repo, "queue", "status").stdout
        if "Queued" not in status and "Running" not in status:
            return status
        time.sleep(2)  # queued experiments run in worker processes; nothing to wait on but them
    raise AssertionError(f"queue still busy after {QUEUE_TIMEOUT_SECONDS} s:\n{status}")


def test_queued_sweep_runs_and_compares(pipeline_run, tmp_path: Path) -> None:
    repo = copy_repo(pipeline_run[0], tmp_path / "repo")
    dvc(repo, "exp", "run", "--queue", "-S", "train.lr=0.5,1.0")
    try:
        # not through a pipe: the workers it starts could hold a captured stdout open, and
        # reading it to its end would then wait for them (seen once: a run hung here)
        subprocess.run([sys.executable, "-m", "dvc", "queue", "start", "-j", "2"], cwd=repo, env=dvc_env(),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, timeout=120)
        status = wait_for_queue(repo)
    finally:
        dvc(repo, "queue", "stop", "--kill", check=False)
    assert status.count("Success") == 2, status
    shown = json.loads(dvc(repo, "exp", "show", "--json").stdout)
    runs = [r for rev in shown for e in (rev.get("experiments") or []) for r in e["revs"]]
    lrs = sorted(r["data"]["params"]["params.yaml"]["data"]["train"]["lr"] for r in runs)
    assert lrs == [0.5, 1.0]
    for run in runs:
        assert "accuracy" in run["data"]["metrics"]["metrics/eval/finetune.json"]["data"]
    names = [r["name"] for r in runs]
    diff = json.loads(dvc(repo, "plots", "diff", *names, "--json").stdout)
    # DVCLive's curves and evaluate's plots are cached outputs: read from the cache per experiment
    for title in ("Accuracy per epoch (train and val; train, then finetune stage)",
                  "Test confusion matrix, finetuned model"):
        revisions = {rev for plot in diff["data"][title] for rev in plot["revisions"]}
        assert set(names) <= revisions, title


def test_push_then_pull_restores_everything_from_a_remote(pipeline_run, tmp_path: Path) -> None:
    repo = copy_repo(pipeline_run[0], tmp_path / "repo")
    dvc(repo, "remote", "add", "-d", "store", str(tmp_path / "remote"))
    dvc(repo, "push")
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    shutil.rmtree(repo / ".dvc" / "cache")
    for out in ("data", "models", "dvclive", "plots"):
        shutil.rmtree(repo / out)
    assert dvc(repo, "status", "-q", check=False).returncode == 1
    dvc(repo, "pull")
    assert dvc(repo, "status", "-q", check=False).returncode == 0
    assert yaml.safe_load((repo / "dvc.lock").read_text()) == lock
    assert len(list((repo / "data" / "images").glob("*/*/*.png"))) == 120
    assert (repo / "models" / "finetune" / "model.pt").is_file()
    assert (repo / "dvclive" / "train" / "plots" / "metrics" / "train" / "loss.tsv").is_file()
    assert (repo / "plots" / "eval" / "finetune" / "confusion.csv").is_file()


def start_experiments(repo: Path, *flags: str) -> list[tuple[int, str]]:
    """`dvc exp run [flags] -S train.seed=N`, named seed-N, for seeds 11 and 12 started together:
    each one's exit status and what it printed on stderr."""
    runs = [subprocess.Popen([sys.executable, "-m", "dvc", "exp", "run", *flags, "-n", f"seed-{seed}",
                              "-S", f"train.seed={seed}"], cwd=repo, env=dvc_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True) for seed in (11, 12)]
    errors = [run.communicate(timeout=600)[1] for run in runs]
    return [(run.returncode, error) for run, error in zip(runs, errors)]


def recorded_experiments(repo: Path) -> list[dict]:
    shown = json.loads(dvc(repo, "exp", "show", "--json").stdout)
    return [r for rev in shown for e in (rev.get("experiments") or []) for r in e["revs"]]


# How a `dvc exp run` beside another stops: at DVC's lock on an output, at ours (DVC's record of
# the experiment is gone), or, when the other held DVC's repo lock too long, at that lock
STOPPED = ("is busy, it is being blocked by", "another `dvc exp run` started in this workspace",
           "Unable to acquire lock")


def test_two_plain_experiments_at_once_stop_with_a_message_each_and_record_nothing(pipeline_run, tmp_path) -> None:
    """DVC runs one experiment per workspace, and two started together take each other's params:
    one stops at DVC's lock ("is busy"), the other at its next stage of ours, before any output.
    Whatever the timing, each failure is one of those messages and nothing is recorded under
    params it was not made with."""
    repo = copy_repo(pipeline_run[0], tmp_path / "repo")
    finished = start_experiments(repo)
    errors = [error for status, error in finished if status != 0]
    assert all(sum(message in error for message in STOPPED) == 1 for error in errors), errors
    assert not [error for error in errors if "NoneType" in error], errors
    recorded = recorded_experiments(repo)
    assert len(recorded) == 2 - len(errors), finished
    for run in recorded:
        assert run["name"] == f"seed-{run['data']['params']['params.yaml']['data']['train']['seed']}"
    model_seed = json.loads((repo / "models/train/model.json").read_text())["params"]["seed"]
    params_seed = yaml.safe_load((repo / "params.yaml").read_text())["train"]["seed"]
    assert model_seed == (0 if len(errors) == 2 else params_seed)  # 0: the committed model
    if len(errors) == 2:  # the usual timing: one stops at DVC's lock on an output, one at ours
        assert sorted(message for error in errors for message in STOPPED if message in error) == sorted(STOPPED[:2])


def test_two_temp_experiments_at_once_each_record_their_own_params(pipeline_run, tmp_path: Path) -> None:
    """README's way to run experiments side by side: each `--temp` run works in its own copy."""
    repo = copy_repo(pipeline_run[0], tmp_path / "repo")
    finished = start_experiments(repo, "--temp")
    assert [status for status, _ in finished] == [0, 0], finished
    assert yaml.safe_load((repo / "params.yaml").read_text())["train"]["seed"] == 0  # untouched
    recorded = recorded_experiments(repo)
    assert sorted(run["name"] for run in recorded) == ["seed-11", "seed-12"]
    for run in recorded:
        seed = run["data"]["params"]["params.yaml"]["data"]["train"]["seed"]
        assert run["name"] == f"seed-{seed}"
        dvc(repo, "exp", "apply", run["name"])  # its outputs, from the cache
        assert json.loads((repo / "models/train/model.json").read_text())["params"]["seed"] == seed
