"""Images per second delivered to the training step, three ways over the same image folder:

- in memory: the training stages' BatchLoader over the split held whole (the default where it
  fits train.memory_budget);
- streamed: StreamLoader reading the split's pack (preprocess's <split>.npy) batch by batch,
  `workers` threads ahead;
- torchvision's ImageFolder + DataLoader with the same worker count, the same augmentation
  (reflect-padded random crop, horizontal flip) and normalization: what a user would write.

usage: python -m bench.loading [--folder DIR] [--workers N]

Without --folder, it generates ImageFolders of noise PNGs: 10,000 images at CIFAR's 32 px and
1,500 at 160 px. With --folder (an ImageFolder layout,
e.g. the extracted CIFAR-10 JPEGs), that folder at its own size. Every loader is timed over
one epoch after a warm-up epoch, so the pack and the images are in the page cache alike.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torchvision
import torchvision.transforms as T
from PIL import Image

from stages.lib.data import (BatchLoader, Pack, PackedImages, Sampling, StreamLoader, normalize,
                             read_classes, read_normalization)
from stages.lib.datasets import DATASETS
from stages.lib.devices import cpu_summary
from stages.lib.params import PreprocessParams
from stages.preprocess import preprocess

BATCH = 256
PADDING = 2
GENERATED = {32: 10_000, 160: 1_500}  # side -> images


def write_noise_folder(root: Path, side: int, count: int, classes: int = 10) -> Path:
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / f"class_{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png", compress_level=1)
    return root


def epoch_rate(batches: Iterable) -> float:
    """Images per second over one pass, each batch touched as a step would take it."""
    start, images = time.perf_counter(), 0
    for batch in batches:
        images += len(batch[0])
        batch[0].sum()  # a step reads every value; a lazy loader cannot skip its work
    return images / (time.perf_counter() - start)


def best_of_two(make: callable) -> float:
    """The second epoch's rate (the first warms caches, workers and allocator)."""
    epoch_rate(make())
    return epoch_rate(make())


def rates(folder: Path, images_dir: Path, workers: int) -> dict[str, float]:
    stats = read_normalization(images_dir)
    pack = Pack(images_dir, "train", len(read_classes(images_dir)))
    labels = torch.zeros(len(pack), dtype=torch.int64)
    sampling = Sampling(crop_padding=PADDING, flip=True, shuffle=True, drop_last=True, seed=0)
    held = normalize(torch.from_numpy(pack.read_all()), stats["mean"], stats["std"])
    memory = BatchLoader(held, labels, BATCH, sampling)
    stream = StreamLoader(PackedImages(pack, stats, torch.device("cpu")), labels, BATCH, sampling,
                          workers=workers)
    side = pack.shape[-1]
    transform = T.Compose([T.RandomCrop(side, padding=PADDING, padding_mode="reflect"),
                           T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(stats["mean"], stats["std"])])
    dataset = torchvision.datasets.ImageFolder(str(folder), transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True, drop_last=True,
                                         num_workers=workers, persistent_workers=True)
    return {"in memory": best_of_two(memory.indexed), "streamed": best_of_two(stream.indexed),
            "ImageFolder": best_of_two(lambda: loader)}


def measure(folder: Path, side: int | None, workers: int, scratch: Path) -> None:
    images_dir = scratch / f"images_{side or 'own'}"
    params = PreprocessParams(val_fraction=0.0, seed=0, workers=2, test_fraction=0.1)
    preprocess(folder, images_dir, params, DATASETS["folder"])
    result = rates(folder, images_dir, workers)
    shape = "x".join(map(str, Pack(images_dir, "train", len(read_classes(images_dir))).shape))
    base = result["in memory"]
    print(f"\n{shape} (train split), batch {BATCH}, {workers} workers, {cpu_summary()}")
    for name, rate in result.items():
        print(f"  {name:12s} {rate:10.0f} images/s  {rate / base:5.2f}x in memory  "
              f"{rate / result['ImageFolder']:5.2f}x ImageFolder")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, help="an ImageFolder of your own (default: generated)")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        if args.folder:
            measure(args.folder, None, args.workers, scratch)
            return
        for side, count in GENERATED.items():
            folder = write_noise_folder(scratch / f"noise_{side}", side, count)
            measure(folder, side, args.workers, scratch)


if __name__ == "__main__":
    main()
