import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from stages.lib.devices import cpu_flags, cpu_model, pick_precision
from stages.lib.loop import Checkpoint, fit
from tests.conftest import ROOT
from tests.test_loop import make_training, toy_data


def stage_dir(tmp_path: Path, image_folder: Path, **train_changes) -> Path:
    """A working directory with the project's params, shrunk, and the test image folder."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"].update({"epochs": 2.0, "batch_size": 30, "eval_batch_size": 50, **train_changes})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "images").symlink_to(image_folder)
    return tmp_path


def run_stage(cwd: Path, module: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env,
                          capture_output=True, text=True)


def train(cwd: Path, name: str) -> subprocess.CompletedProcess:
    return run_stage(cwd, "stages.train", "data/images", f"models/{name}", f"metrics/{name}.json",
                     f"dvclive/{name}", f"checkpoints/{name}.pt")


@pytest.mark.slow
def test_train_stage_is_deterministic_on_cpu(tmp_path: Path, image_folder: Path) -> None:
    # pinned to the CPU: on a GPU machine `auto` would compare CUDA runs, which need not match
    cwd = stage_dir(tmp_path, image_folder, device="cpu", eval_every=1)  # a curve point per epoch
    for name in ("a", "b"):
        result = train(cwd, name)
        assert result.returncode == 0, result.stderr
        assert result.stderr.startswith(f"device cpu (CPU {cpu_model()}: ")
    for name in ("model.pt", "model.json"):  # the same weights make the same folder, byte for byte
        assert (cwd / "models/a" / name).read_bytes() == (cwd / "models/b" / name).read_bytes()
    metrics = json.loads((cwd / "metrics/a.json").read_text())
    assert metrics["epochs"] == 2.0 and 0 <= metrics["val_accuracy"] <= 1
    precision = pick_precision(torch.device("cpu"), "auto")
    # only numbers that compare: the machine is in model.json
    assert all(isinstance(v, (int, float)) for v in metrics.values())
    assert 0 < metrics["train_seconds"] < metrics["wall_seconds"]
    sidecar = json.loads((cwd / "models/a/model.json").read_text())
    assert sidecar["hardware"]["precision"] == precision.name
    assert sidecar["hardware"]["precision_reason"] == precision.reason
    assert sidecar["hardware"]["device"] == "cpu" and sidecar["hardware"]["cpu_flags"] == " ".join(cpu_flags())
    assert sidecar["classes"][0] == "airplane" and sidecar["params"]["arch"] == "airbench"
    assert len(sidecar["normalization"]["mean"]) == 3
    curves = (cwd / "dvclive/a/plots/metrics/val/accuracy.tsv").read_text().splitlines()
    assert curves[0] == "step\taccuracy" and len(curves) == 3
    for name in ("lr", "epoch_seconds", "images_per_second"):  # live progress, per epoch
        assert len((cwd / f"dvclive/a/plots/metrics/{name}.tsv").read_text().splitlines()) == 3
    # weight and gradient histograms per epoch, per conv / linear layer (not the frozen stem's grads)
    weights = json.loads((cwd / "dvclive/a/plots/custom/weights.json").read_text())
    gradients = json.loads((cwd / "dvclive/a/plots/custom/gradients.json").read_text())
    assert {r["epoch"] for r in weights} == {r["epoch"] for r in gradients} == {1, 2}
    assert "whiten.weight" in {r["layer"] for r in weights} - {r["layer"] for r in gradients}
    assert "head.weight" in {r["layer"] for r in gradients}
    per_layer = sum(r["count"] for r in weights if r["layer"] == "head.weight" and r["epoch"] == 2)
    assert per_layer == 256 * 10  # every weight counted once
    # DVCLive's step counts epochs from 1: the x axis of the epoch plots
    assert [line.split("\t")[0] for line in curves[1:]] == ["1", "2"]
    assert json.loads((cwd / "dvclive/a/metrics.json").read_text())["step"] == 2  # the last epoch


@pytest.mark.slow
def test_train_stage_refuses_bad_params_before_writing(tmp_path: Path, image_folder: Path) -> None:
    cwd = stage_dir(tmp_path, image_folder, lr="abc")
    result = train(cwd, "a")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: params: train.lr must be a number, found 'abc' "
        "(fix it in params.yaml or in `dvc exp run -S train.lr=...`)"]
    assert sorted(p.name for p in cwd.iterdir()) == ["data", "params.yaml"]


class Crash(Exception):
    pass


def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    val = toy_data(50, seed=1)
    reference = make_training()
    fit(reference, val, Checkpoint(tmp_path / "ref.pt", "same"), lambda epoch, row: None)

    def crash_after_first_epoch(epoch: int, row: dict) -> None:
        if epoch == 0:
            raise Crash  # the checkpoint of epoch 1 is already written
    crashed = make_training()
    with pytest.raises(Crash):
        fit(crashed, val, Checkpoint(tmp_path / "run.pt", "same"), crash_after_first_epoch)
    resumed = make_training()
    logged = []
    fit(resumed, val, Checkpoint(tmp_path / "run.pt", "same"), lambda e, row: logged.append(e))
    assert logged == [0, 1, 2]  # the history is replayed to DVCLive, then two more epochs
    for key, value in reference.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key
    assert resumed.history == reference.history


def test_a_checkpoint_for_other_params_is_not_resumed(tmp_path: Path) -> None:
    first = make_training()
    fit(first, None, Checkpoint(tmp_path / "c.pt", "params-1"), lambda e, row: None)
    second = make_training()
    logged = []
    fit(second, None, Checkpoint(tmp_path / "c.pt", "params-2"), lambda e, row: logged.append(e))
    assert logged == [0, 1, 2] and second.step == first.step
