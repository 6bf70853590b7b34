"""Faults beyond the download: hostile pickles and archives, full disks, diverging or
out-of-memory training. A SIGKILL between epochs is the crash matrix's (tests/test_crash_matrix.py)."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import stages.extract
from stages.extract import extract
from stages.lib import loop
from stages.lib.datasets import DATASETS
from stages.lib.loop import Checkpoint, fit
from stages.lib.outputs import EXPERIMENT_RECORD, StageError, atomic_dir, stage_main, write_json
from stages.lib.params import PreprocessParams
from stages.preprocess import preprocess
from tests.cifar_format import batch_members, dumps_py2, unpickle_trusted, write_tarball
from tests.conftest import ROOT
from tests.test_loop import make_training, toy_data
from tests.test_preprocess import batch_with, corrupt
from tests.test_train import stage_dir


@pytest.mark.parametrize("payload, message", [
    # GLOBAL + REDUCE (protocol 0-2), the classic os.system gadget
    (b"cos\nsystem\n(S'echo owned'\ntR.", "refuses to load global os.system"),
    # STACK_GLOBAL (protocol 4)
    (b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93\x8c\x011\x85R.", "refuses to load global builtins.eval"),
    # INST: calls the class named inline with the marked arguments
    (b"(S'echo owned'\nios\nsystem\n.", "refuses to load global os.system"),
    # a numpy global that is not one of the three a batch needs
    (b"cnumpy\nload\n(S'x'\ntR.", "refuses to load global numpy.load"),
])
def test_every_opcode_route_to_a_global_is_refused(batches_dir, tmp_path, payload, message) -> None:
    source = corrupt(batches_dir, tmp_path, "test_batch", payload)
    with pytest.raises(StageError, match=message):
        preprocess(source, tmp_path / "images", PreprocessParams(0.1, 0, 1), DATASETS["cifar10"])
    assert not (tmp_path / "images").exists()


@pytest.mark.parametrize("changes, message", [
    ({"data": np.array([[1] * 3072] * 20, dtype=object)}, "must be a uint8 array, found object"),
    ({"labels": [0.5] * 20}, "'labels' must be a list of ints"),
    ({"labels": [True] * 20}, "'labels' must be a list of ints"),
    ({"labels": np.zeros(20, dtype=np.int64)}, "'labels' must be a list of ints"),
])
def test_wrong_dtypes_are_refused(batches_dir, tmp_path, changes, message) -> None:
    source = corrupt(batches_dir, tmp_path, "data_batch_1", batch_with(**changes))
    with pytest.raises(StageError, match=message):
        preprocess(source, tmp_path / "images", PreprocessParams(0.1, 0, 1), DATASETS["cifar10"])


def test_missing_key_is_refused(batches_dir, tmp_path) -> None:
    batch = unpickle_trusted(batch_members()["data_batch_1"])
    del batch[b"labels"]
    source = corrupt(batches_dir, tmp_path, "data_batch_1", dumps_py2(batch))
    with pytest.raises(StageError, match="data_batch_1: missing key 'labels'"):
        preprocess(source, tmp_path / "images", PreprocessParams(0.1, 0, 1), DATASETS["cifar10"])


def test_hostile_filenames_are_never_used(batches_dir, tmp_path) -> None:
    payload = batch_with(filenames=[b"../../../../tmp/evil.png"] * 20)
    source = corrupt(batches_dir, tmp_path, "data_batch_1", payload)
    preprocess(source, tmp_path / "images", PreprocessParams(0.1, 0, 1), DATASETS["cifar10"])
    pngs = list((tmp_path / "images").rglob("*.png"))
    assert len(pngs) == 120 and all(p.stem.isdigit() for p in pngs)
    assert not Path("/tmp/evil.png").exists()


def test_member_larger_than_allowed_is_refused_before_reading(tmp_path, monkeypatch) -> None:
    archive = tmp_path / "raw" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    write_tarball(archive, batch_members())
    monkeypatch.setattr(stages.extract, "MAX_MEMBER_BYTES", 1000)
    with pytest.raises(StageError, match="declares \\d+ bytes, more than 1000"):
        extract(archive.parent, tmp_path / "out", DATASETS["cifar10"])
    assert not (tmp_path / "out").exists()


def test_corrupt_gzip_stream_is_refused(tarball, tmp_path) -> None:
    data = bytearray(tarball[0].read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)  # zeroed bytes mid-stream
    archive = tmp_path / "raw" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    archive.write_bytes(bytes(data))
    with pytest.raises(StageError, match="truncated or corrupt"):
        extract(archive.parent, tmp_path / "out", DATASETS["cifar10"])
    assert not (tmp_path / "out").exists()


def run_limited(cwd: Path, limit_bytes: int, *args: str) -> subprocess.CompletedProcess:
    """Run a stage with a file-size limit: writes past it fail as on a full disk."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, preexec_fn=limit)


@pytest.mark.slow
def test_disk_full_while_writing_pngs_leaves_no_folder(batches_dir, tmp_path) -> None:
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    result = run_limited(tmp_path, 100, "stages.preprocess", str(batches_dir), "images")
    assert result.returncode == 1
    assert "the file size limit was hit" in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


@pytest.mark.slow
def test_disk_full_while_checkpointing_keeps_nothing_partial(tmp_path, image_folder) -> None:
    cwd = stage_dir(tmp_path, image_folder)
    result = run_limited(cwd, 200_000, "stages.train", "data/images", "models/train",
                         "metrics/train.json", "dvclive/train", "checkpoints/train.pt")
    assert result.returncode == 1, result.stderr
    assert "checkpoints/train.pt: cannot write it, the file size limit was hit" in result.stderr
    assert not (cwd / "checkpoints").exists() or list((cwd / "checkpoints").iterdir()) == []
    assert not (cwd / "models").exists()


def test_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path) -> None:
    training = make_training()
    healthy = training.criterion

    def poisoned(logits, labels):
        loss = healthy(logits, labels)
        return loss * float("nan") if training.epoch == 1 else loss
    training.criterion = poisoned
    checkpoint = Checkpoint(tmp_path / "c.pt", "x")
    with pytest.raises(StageError, match="non-finite loss at epoch 2, step 5"):
        fit(training, None, checkpoint, lambda e, row: None)
    assert torch.load(checkpoint.path, weights_only=True)["epoch"] == 1


def test_out_of_memory_names_the_batch_size(tmp_path, monkeypatch) -> None:
    training = make_training()

    def exhausted(training, images, labels):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(loop, "train_step", exhausted)
    with pytest.raises(StageError, match="out of memory on cpu at epoch 1 with batch_size 50"):
        fit(training, toy_data(20), Checkpoint(tmp_path / "c.pt", "x"), lambda e, row: None)


@pytest.mark.slow
def test_a_killed_runs_scratch_is_swept_by_the_next_run_and_a_live_ones_is_kept(tmp_path) -> None:
    dest = tmp_path / "images"
    dead = tmp_path / f".images.{2 ** 31 - 2}.abc123.tmp"  # no process has that pid
    dead.mkdir()
    (dead / "0001.png").write_bytes(b"partial")
    live = tmp_path / f".images.{os.getpid()}.def456.tmp"  # a running process's
    live.mkdir()
    other = tmp_path / ".metrics.json.1.x.tmp"  # another output's scratch: not this one's to sweep
    other.write_text("{}")
    with atomic_dir(dest) as tmp:
        assert tmp.name.startswith(f".images.{os.getpid()}.")
        (tmp / "a.png").write_bytes(b"png")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([dest.name, live.name, other.name])


def test_an_output_is_refused_when_params_yaml_changed_under_the_stage(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("train:\n  seed: 11\n")

    @stage_main
    def main() -> None:
        (tmp_path / "params.yaml").write_text("train:\n  seed: 12\n")  # another `dvc exp run -S`
        write_json(tmp_path / "metrics.json", {"seed": 11})

    with pytest.raises(SystemExit, match=r"params.yaml changed while this stage ran: another "
                                         r"`dvc exp run` in this workspace\? Nothing was written"):
        main()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # no output, no scratch

    @stage_main
    def unchanged() -> None:
        write_json(tmp_path / "metrics.json", {"seed": 12})

    unchanged()
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"seed": 12}


def test_a_workspace_experiment_whose_dvc_record_is_gone_stops_before_any_output(tmp_path, monkeypatch) -> None:
    """What a second `dvc exp run` beside this one leaves (deleted, or its own name in it)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("train:\n  seed: 11\n")
    record = tmp_path / EXPERIMENT_RECORD
    record.parent.mkdir(parents=True)
    monkeypatch.setenv("DVC_EXP_NAME", "seed-11")

    @stage_main
    def main() -> None:
        write_json(tmp_path / "metrics.json", {"seed": 11})

    for root, recorded, lands in [(tmp_path, "seed-11", True), (tmp_path.parent, None, True),  # --temp's copy
                                  (tmp_path, "seed-12", False), (tmp_path, None, False)]:
        monkeypatch.setenv("DVC_ROOT", str(root))
        record.unlink(missing_ok=True)
        if recorded:
            record.write_text(json.dumps({"name": recorded, "status": 2}))
        (tmp_path / "metrics.json").unlink(missing_ok=True)
        if lands:
            main()
        else:
            with pytest.raises(SystemExit, match=r"another `dvc exp run` started in this workspace while "
                                                 r"experiment seed-11 ran .* Nothing was written"):
                main()
        assert (tmp_path / "metrics.json").exists() == lands
