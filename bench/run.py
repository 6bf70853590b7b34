"""Benchmarks: each figure beside its baseline, measured in the same process.

usage: python -m bench.run [IMAGES_DIR] [BATCHES_DIR]   (defaults: data/images,
       data/extracted/cifar10, as `make repro` leaves them)

1. preprocess: parallel PNG writer vs one process
2. training throughput with LeNet: the pipeline's loop vs the tutorials' recipe
(Data delivery to the step is bench.loading's: in memory, streamed, and ImageFolder.)
"""
from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision.transforms as T

from stages.data import BatchLoader, CsvImageDataset, decode_split, normalize, read_classes, read_normalization
from stages.datasets import DATASETS
from stages.devices import pick_precision
from stages.loop import Training, param_groups
from stages.model import build_model
from stages.params import PreprocessParams, load_params
from stages.preprocess import Fit, build_splits, read_source, write_images

BATCH = 1024
TUTORIAL_STEPS = 300  # batches of 16 timed for the tutorials' recipe
PREPROCESS_REPEATS = 3


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def encode(splits: list, classes: list[str], root: Path, workers: int) -> None:
    """preprocess's writer (PNGs, CSV and pack) with `workers` processes, their start included."""
    with multiprocessing.Pool(workers) if workers > 1 else contextlib.nullcontext() as pool:
        write_images(splits, classes, root, Fit(3, None), pool)


def bench_preprocess(batches_dir: Path) -> None:
    """In RAM (/dev/shm where there is one): on this machine's virtual disk the time to create
    10,000 small files swung from 0.3 s to 3.4 s between identical runs, drowning the encoder.
    Alternating runs, median of each."""
    source = read_source(batches_dir, DATASETS["cifar10"])
    splits, classes = build_splits(source, PreprocessParams(val_fraction=0.1, seed=0, workers=1)), source.classes
    test = [s for s in splits if s.name == "test"]
    ram = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    times: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(PREPROCESS_REPEATS):
        for workers in times:
            with tempfile.TemporaryDirectory(dir=ram) as tmp:
                times[workers].append(timed(lambda: encode(test, classes, Path(tmp), workers))[0])
    one_s, two_s = (statistics.median(times[w]) for w in (1, 2))
    n = len(test[0].labels)
    print(f"1. preprocess, {n} PNGs into {ram or 'a temporary folder'}: 2 processes {two_s:.2f} s vs "
          f"1 process {one_s:.2f} s -> {one_s / two_s:.2f}x (median of {PREPROCESS_REPEATS})")


def tutorial_throughput(images_dir: Path) -> float:
    """The 60-minute blitz: per-sample PIL DataLoader, batch 16, LeNet, Adam 1e-3, fp32."""
    transform = T.Compose([T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)])
    dataset = CsvImageDataset(images_dir / "train.csv", images_dir, transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=16, shuffle=True, num_workers=2)
    torch.manual_seed(0)
    model = build_model("lenet", 10, (3, 32, 32))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    criterion = torch.nn.CrossEntropyLoss()
    start, seen = time.perf_counter(), 0
    for step, (images, labels) in enumerate(loader):
        optimizer.zero_grad()
        criterion(model(images), labels).backward()
        optimizer.step()
        seen += len(labels)
        if step + 1 == TUTORIAL_STEPS:
            break
    return seen / (time.perf_counter() - start)


def pipeline_throughput(images_dir: Path) -> float:
    """The pipeline's loop with LeNet: one epoch from the decoded tensor, default knobs."""
    params = dataclasses.replace(load_params().train, arch="lenet", optimizer="adam", lr=1e-3,
                                 epochs=1.0, ema_every=0)
    classes, stats = read_classes(images_dir), read_normalization(images_dir)
    images, labels = decode_split(images_dir / "train.csv", images_dir, len(classes))
    images = normalize(images, stats["mean"], stats["std"]).contiguous(memory_format=torch.channels_last)
    loader = BatchLoader(images, labels, params.batch_size, crop_padding=params.crop_padding,
                         flip=params.flip, shuffle=True, drop_last=True, seed=0)
    model = build_model("lenet", len(classes), tuple(images.shape[1:])).to(memory_format=torch.channels_last)
    groups = param_groups(model, params.lr, params.lr, 0.0, 1.0, 0, 0)
    cpu = torch.device("cpu")
    training = Training(model, groups, params, loader, cpu, pick_precision(cpu, params.amp))
    seconds, _ = timed(training.run_epoch)
    return training.step * params.batch_size / seconds


def bench_training(images_dir: Path) -> None:
    base = tutorial_throughput(images_dir)
    ours = pipeline_throughput(images_dir)
    print(f"2. LeNet training throughput: pipeline loop {ours:.0f} img/s vs tutorials' recipe "
          f"{base:.0f} img/s -> {ours / base:.1f}x")


def main() -> None:
    images_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("data/images")
    batches_dir = Path(sys.argv[2]) if len(sys.argv) > 2 else Path("data/extracted/cifar10")
    if not (images_dir / "train.csv").exists() or not batches_dir.is_dir():
        raise SystemExit(f"bench: needs {images_dir} and {batches_dir}; run `make repro` first")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    bench_preprocess(batches_dir)
    bench_training(images_dir)


if __name__ == "__main__":
    main()
