"""Streaming from the pack: the same batches as in memory for the same seed, and a training
split larger than the memory budget trained within the budget plus a fixed overhead."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from stages.lib.data import (BatchLoader, Pack, PackedImages, Sampling, StreamLoader, load_data,
                             normalize)
from stages.lib.devices import pick_precision
from stages.lib.loop import Env, Training, train_one_epoch, training_loader
from stages.lib.nets import build_model
from stages.lib.optim import Rates, param_groups
from tests.conftest import ROOT
from tests.folder_format import write_folder
from tests.test_loop import train_params

STATS = {"mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3]}
CPU = torch.device("cpu")


def packed(tmp_path: Path, n: int = 50, size: tuple[int, int] = (12, 16)) -> tuple[torch.Tensor, Pack]:
    pixels = np.random.default_rng(0).integers(0, 256, (n, 3, *size), dtype=np.uint8)
    np.save(tmp_path / "train.npy", pixels)
    np.save(tmp_path / "train-labels.npy", np.arange(n) % 5)
    return normalize(torch.from_numpy(pixels), STATS["mean"], STATS["std"]), Pack(tmp_path, "train", 5)


@pytest.mark.parametrize("shard", [(0, 1), (1, 2)])
def test_streamed_batches_equal_the_in_memory_ones_epoch_after_epoch(tmp_path: Path, shard) -> None:
    images, pack = packed(tmp_path)
    labels = torch.arange(50) % 5
    sampling = Sampling(crop_padding=2, flip=True, shuffle=True, drop_last=True, seed=7, shard=shard)
    memory = BatchLoader(images, labels, 8, sampling)
    stream = StreamLoader(PackedImages(pack, STATS, CPU), labels, 8, sampling, workers=2)
    for epoch in range(3):  # epoch 1 is mirrored; epoch 2 draws from a selected subset
        if epoch == 2:
            memory.subset = stream.subset = torch.arange(0, 50, 3)
        pairs = list(zip(memory.indexed(), stream.indexed(), strict=True))
        assert len(pairs) == len(memory) > 0
        for (a, label_a, index_a), (b, label_b, index_b) in pairs:
            assert torch.equal(index_a, index_b) and torch.equal(label_a, label_b)
            assert a.shape == (len(index_a), 3, 12, 16) and torch.equal(a, b)


def test_packed_images_index_split_and_shape_like_the_tensor(tmp_path: Path) -> None:
    images, pack = packed(tmp_path, n=23)
    streamed = PackedImages(pack, STATS, CPU)
    assert streamed.shape == images.shape and len(streamed) == 23
    assert torch.equal(streamed[:5], images[:5]) and streamed[torch.tensor([], dtype=torch.int64)].shape == (0, 3, 12, 16)
    assert torch.equal(streamed[torch.tensor([9, 2, 3])], images[[9, 2, 3]])
    assert torch.equal(torch.cat(list(streamed.split(10))), images)


def test_load_data_streams_only_past_the_budget(tmp_path: Path, capsys) -> None:
    root = write_folder(tmp_path / "images", 3, 8, 2, {"train": 10, "val": 2})
    assert isinstance(load_data(root, CPU, budget=10 ** 9).train_images, torch.Tensor)
    data = load_data(root, CPU, budget=1000)
    assert isinstance(data.train_images, PackedImages) and isinstance(data.val[0], PackedImages)
    assert "streamed from the packs" in capsys.readouterr().out


# The stage's peak resident memory, from /proc's VmHWM: getrusage's ru_maxrss would also count
# what the forked child held before its exec (pytest's own memory)
PEAK = ("import runpy, sys\n"
        "sys.argv = ['stages.train', *sys.argv[1:]]\n"
        "try:\n    runpy.run_module('stages.train', run_name='__main__')\n"
        "finally:\n    hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
        "    print('peak', int(hwm.split()[1]) * 1024)\n")
BUDGET = 16 * 2 ** 20
# The fixed overhead a streaming run may take beyond the tiny run's peak and the budget: the
# batches in flight (workers + 2 of 100 images at 48 KiB of float32 each, each held as its
# read, normalized, flipped, padded and cropped copies: 120 MiB), and the allocator's slack
BATCH_OVERHEAD = 160 * 2 ** 20


def train_peak(project: Path, images: Path, budget: str) -> tuple[int, dict]:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"].update(arch="lenet", optimizer="adam", lr=0.003, epochs=1.0, batch_size=100, progressive_from=0,
                           select_from=0, freeze_from=0, memory_budget=budget, device="cpu")
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    out = project / "out"
    result = subprocess.run([sys.executable, "-c", PEAK, str(images), str(out / "model"),
                             str(out / "metrics.json"), str(out / "live"), str(out / "ckpt.pt")],
                            cwd=project, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    peak = int(result.stdout.split("peak ")[-1])
    return peak, json.loads((out / "metrics.json").read_text())


@pytest.mark.slow
def test_a_split_over_the_budget_trains_within_it_to_the_same_accuracy(project: Path, tmp_path: Path) -> None:
    tiny = write_folder(tmp_path / "tiny", 3, 64, 4, {"train": 30, "val": 25})
    large = write_folder(tmp_path / "large", 3, 64, 4, {"train": 1000, "val": 25})  # 48 MiB packed
    base, _ = train_peak(project, tiny, "auto")
    streamed, streamed_metrics = train_peak(project, large, f"{BUDGET}B")
    in_memory, memory_metrics = train_peak(project, large, "auto")
    mib = {k: round(v / 2 ** 20) for k, v in dict(base=base, streamed=streamed, in_memory=in_memory).items()}
    print(f"peak memory (MiB): {mib}")
    assert streamed <= base + BUDGET + BATCH_OVERHEAD, mib
    assert in_memory > streamed + 300 * 2 ** 20, mib  # the in-memory copies: 4,000 x 48 KiB x 13
    assert abs(streamed_metrics["val_accuracy"] - memory_metrics["val_accuracy"]) <= 0.02


def toy_training(images: torch.Tensor | PackedImages, labels: torch.Tensor) -> Training:
    """LeNet on the toy pack, selection from epoch 1 on: the loop's state at its fullest."""
    params = train_params(arch="lenet", optimizer="adam", lr=0.003, epochs=4.0, batch_size=10,
                          amp=False, ema_every=2, progressive_from=0, select_from=1,
                          select_fraction=0.5, workers=2)
    torch.manual_seed(0)
    model = build_model("lenet", 5, tuple(images.shape[1:]))
    loader = training_loader(params, images, labels, seed=0)
    groups = param_groups(model, Rates(params.lr, params.lr, 0.0, 1.0))
    return Training(model, groups, params, loader, Env(CPU, pick_precision(CPU, params.amp)))


def run_epochs(training: Training, count: int) -> None:
    for _ in range(count):
        train_one_epoch(training)
        training.epoch += 1


def test_a_streamed_run_resumed_midway_trains_as_the_in_memory_run(tmp_path: Path) -> None:
    images, pack = packed(tmp_path, size=(16, 20))
    labels = torch.arange(50) % 5
    whole = toy_training(images, labels)
    run_epochs(whole, 4)
    first = toy_training(PackedImages(pack, STATS, CPU), labels)
    assert isinstance(first.loader, StreamLoader)
    run_epochs(first, 2)
    resumed = toy_training(PackedImages(pack, STATS, CPU), labels)
    resumed.load_state(first.state())
    run_epochs(resumed, 2)
    for key, value in whole.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key
