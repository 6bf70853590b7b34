"""The CSV-annotated image folder: reading and checking it, per sample or decoded at once.

`CsvImageDataset` is the tutorials' custom Dataset for any such folder. The training stages
instead decode a split once into one uint8 tensor (`decode_split`) and draw augmented batches
from it on the training device (`BatchLoader`), as airbench's CifarLoader does.
"""
from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from stages.outputs import StageError

HEADER = ["path", "label", "class_name"]


@dataclass(frozen=True)
class Annotations:
    paths: list[Path]  # absolute, each checked to lie inside the folder
    labels: list[int]


def read_classes(root: Path) -> list[str]:
    path = root / "classes.json"
    try:
        classes = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise StageError(f"{path}: cannot read the class list ({err}); run `dvc repro preprocess`") from None
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise StageError(f"{path}: expected a non-empty JSON list of class names")
    return classes


def read_normalization(root: Path) -> dict[str, list[float]]:
    path = root / "normalization.json"
    try:
        stats = json.loads(path.read_text())
        ok = all(len(stats[k]) == 3 and all(isinstance(v, float) for v in stats[k]) for k in ("mean", "std"))
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise StageError(f"{path}: cannot read normalization ({err}); run `dvc repro preprocess`") from None
    if not ok or min(stats["std"]) <= 0:
        raise StageError(f"{path}: expected mean and std, 3 floats each, std > 0; found {stats}")
    return {"mean": stats["mean"], "std": stats["std"]}


def read_annotations(csv_path: Path, root: Path, num_classes: int) -> Annotations:
    """Read `path,label,class_name` rows, checking header, labels, duplicates and paths."""
    root_resolved = root.resolve()
    paths: list[Path] = []
    labels: list[int] = []
    seen: set[Path] = set()
    try:
        with open(csv_path, newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header != HEADER:
                raise StageError(f"{csv_path}: header must be {','.join(HEADER)}, found {header}")
            for line, row in enumerate(reader, start=2):
                path, label = _check_row(row, root_resolved, num_classes, f"{csv_path}:{line}")
                if path in seen:
                    raise StageError(f"{csv_path}:{line}: duplicate row for {row[0]}")
                seen.add(path)
                paths.append(path)
                labels.append(label)
    except FileNotFoundError:
        raise StageError(f"{csv_path}: not found; run `dvc repro preprocess`") from None
    if not paths:
        raise StageError(f"{csv_path}: no rows")
    return Annotations(paths, labels)


def _check_row(row: list[str], root: Path, num_classes: int, where: str) -> tuple[Path, int]:
    if len(row) != len(HEADER):
        raise StageError(f"{where}: expected {len(HEADER)} fields ({','.join(HEADER)}), found {row}")
    rel, label_text, _ = row
    if not label_text.isdigit() or int(label_text) >= num_classes:
        raise StageError(f"{where}: label must be an integer in [0, {num_classes}), found {label_text!r}")
    path = (root / rel).resolve()
    if Path(rel).is_absolute() or not path.is_relative_to(root):
        raise StageError(f"{where}: path {rel!r} is outside the image folder {root}")
    return path, int(label_text)


def load_image(path: Path, size: tuple[int, int] | None = None) -> Image.Image:
    """Open an image as RGB, checking its size when `size` (width, height) is given."""
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except FileNotFoundError:
        raise StageError(f"{path}: image listed in the CSV does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise StageError(f"{path}: not a readable image ({err})") from None
    if size is not None and rgb.size != size:
        raise StageError(f"{path}: image is {rgb.size[0]}x{rgb.size[1]}, expected {size[0]}x{size[1]}")
    return rgb


class CsvImageDataset(torch.utils.data.Dataset):
    """Per-sample Dataset over a CSV of `path,label,class_name` rows relative to `root`."""

    def __init__(self, csv_path: Path, root: Path, transform: Callable | None = None,
                 num_classes: int | None = None) -> None:
        self.root = Path(root)
        self.classes = read_classes(self.root) if num_classes is None else None
        count = len(self.classes) if self.classes is not None else num_classes
        self.annotations = read_annotations(Path(csv_path), self.root, count)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.annotations.labels)

    def __getitem__(self, index: int) -> tuple[object, int]:
        image = load_image(self.annotations.paths[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, self.annotations.labels[index]


def _decode(path: Path, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(load_image(path, size), dtype=np.uint8)


def decode_split(csv_path: Path, root: Path, num_classes: int,
                 workers: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode every image of a split once: (uint8 N x 3 x H x W, int64 labels N).

    PIL releases the GIL while decoding, so threads use all cores without pickling arrays.
    All images must share the first image's size.
    """
    annotations = read_annotations(csv_path, root, num_classes)
    size = load_image(annotations.paths[0]).size
    with ThreadPoolExecutor(workers) as pool:
        arrays = list(pool.map(lambda p: _decode(p, size), annotations.paths))
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor(annotations.labels, dtype=torch.int64)


def normalize(images: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 N x 3 x H x W -> float32, standardized per channel."""
    mean_t = torch.tensor(mean, device=images.device).view(1, 3, 1, 1) * 255
    std_t = torch.tensor(std, device=images.device).view(1, 3, 1, 1) * 255
    return (images.float() - mean_t) / std_t


def random_crop(padded: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Crop each image of a padded batch at its own random offset, by masked slices.

    With padding r there are (2r+1)^2 offsets; one slice-assign per offset moves every image
    that drew it, instead of a Python loop over images.
    """
    n, r2 = len(padded), padded.size(-1) - size
    shifts = torch.randint(0, r2 + 1, (n, 2), generator=generator, device=generator.device)
    shifts = shifts.to(padded.device)
    out = torch.empty((n, padded.size(1), size, size), dtype=padded.dtype, device=padded.device)
    for dy in range(r2 + 1):
        for dx in range(r2 + 1):
            mask = (shifts[:, 0] == dy) & (shifts[:, 1] == dx)
            out[mask] = padded[mask, :, dy:dy + size, dx:dx + size]
    return out


class BatchLoader:
    """Batches drawn from one normalized tensor on the device, augmented a whole epoch at a time.

    Flips alternate (airbench): each image is flipped at random in epoch 0 and the whole set is
    mirrored every other epoch, so every image is seen both ways in any two consecutive epochs.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, *,
                 crop_padding: int, flip: bool, shuffle: bool, drop_last: bool, seed: int,
                 shard: tuple[int, int] = (0, 1)) -> None:
        self.images, self.labels = images, labels
        # (rank, world): every rank draws the same global batches (same seed) and keeps its
        # strided share, so the union over ranks is exactly the single-process batch.
        self.rank, self.world = shard
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.crop_padding, self.flip = crop_padding, flip
        # CPU generator: its stream is the same on every device, so runs reproduce anywhere.
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch = 0
        self.base = images
        if flip:
            mask = torch.rand(len(images), generator=self.generator) < 0.5
            self.base = torch.where(mask.to(images.device).view(-1, 1, 1, 1), images.flip(-1), images)
        if crop_padding:
            self.base = F.pad(self.base, (crop_padding,) * 4, mode="reflect")

    def __len__(self) -> int:
        count = len(self.labels) / self.batch_size
        return math.floor(count) if self.drop_last else math.ceil(count)

    def epoch_images(self) -> torch.Tensor:
        """This epoch's augmented copy of the whole set."""
        images = self.base
        if self.crop_padding:
            images = random_crop(images, self.images.size(-1), self.generator)
        if self.flip and self.epoch % 2 == 1:
            images = images.flip(-1)
        return images

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        images = self.epoch_images()
        self.epoch += 1
        n = len(self.labels)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        order = order.to(images.device)
        for i in range(len(self)):
            index = order[i * self.batch_size:(i + 1) * self.batch_size][self.rank::self.world]
            yield images[index], self.labels[index]
