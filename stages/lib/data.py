"""The CSV-annotated image folder: reading and checking it, per sample, decoded at once, or
from the packs preprocess wrote beside it.

`CsvImageDataset` is the tutorials' custom Dataset for any such folder. The training stages
instead read each split's pack (`load_data`) and draw augmented batches from it: held whole on
the training device where it fits the memory budget (`BatchLoader`, as airbench's CifarLoader
does), else read batch by batch from the pack in background threads (`StreamLoader`), with the
same batches for the same seed.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import csv
import hashlib
import json
import math
import mmap
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from stages.lib.folder import (CLASSES_FILE, CSV_HEADER, MODES, NORMALIZATION_FILE, decode_image,
                               labels_path, pack_header, pack_path)
from stages.lib.outputs import StageError

DECODE_CHUNK = 2500  # images per task sent to a decoding process


@dataclass(frozen=True)
class Annotations:
    paths: list[Path]  # absolute, each checked to lie inside the folder
    labels: list[int]


def read_classes(root: Path) -> list[str]:
    path = root / CLASSES_FILE
    try:
        classes = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise StageError(f"{path}: cannot read the class list ({err}); run `dvc repro preprocess`") from None
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise StageError(f"{path}: expected a non-empty JSON list of class names")
    return classes


def read_normalization(root: Path) -> dict[str, list[float]]:
    """Per-channel mean and std: their length is the folder's channel count (1 or 3)."""
    path = root / NORMALIZATION_FILE
    try:
        stats = json.loads(path.read_text())
        channels = len(stats["mean"])
        ok = channels in MODES and all(
            len(stats[k]) == channels and all(isinstance(v, float) for v in stats[k])
            for k in ("mean", "std"))
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise StageError(f"{path}: cannot read normalization ({err}); run `dvc repro preprocess`") from None
    if not ok or min(stats["std"]) <= 0:
        raise StageError(f"{path}: expected mean and std, 1 or 3 floats each (one per channel), "
                         f"std > 0; found {stats}")
    return {"mean": stats["mean"], "std": stats["std"]}


def folder_channels(root: Path) -> int:
    return len(read_normalization(root)["mean"])


def read_annotations(csv_path: Path, root: Path, num_classes: int) -> Annotations:
    """Read `path,label,class_name` rows, checking header, labels, duplicates and paths."""
    resolve = _Resolver(root)
    paths: list[Path] = []
    labels: list[int] = []
    seen: set[Path] = set()
    try:
        with open(csv_path, newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header != list(CSV_HEADER):
                raise StageError(f"{csv_path}: header must be {','.join(CSV_HEADER)}, found {header}")
            for line, row in enumerate(reader, start=2):
                path, label = _check_row(row, resolve, num_classes, f"{csv_path}:{line}")
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


class _Resolver:
    """Resolves CSV paths under the folder like Path.resolve(), but realpath()s each directory
    once: a full resolve per row (7 lstat calls) took 2 s of a 45,000-row split. A file still
    costs one lstat, so a symlinked image is followed and checked like any other path."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.dirs: dict[str, str] = {}

    def __call__(self, rel: str) -> Path:
        head, name = os.path.split(rel)
        parent = self.dirs.get(head)
        if parent is None:
            parent = self.dirs[head] = os.path.realpath(os.path.join(self.root, head))
        path = os.path.join(parent, name)
        if name in ("", ".", "..") or os.path.islink(path):
            path = os.path.realpath(path)
        return Path(path)


def _check_row(row: list[str], resolve: _Resolver, num_classes: int, where: str) -> tuple[Path, int]:
    if len(row) != len(CSV_HEADER):
        raise StageError(f"{where}: expected {len(CSV_HEADER)} fields ({','.join(CSV_HEADER)}), found {row}")
    rel, label_text, _ = row
    if not label_text.isdigit() or int(label_text) >= num_classes:
        raise StageError(f"{where}: label must be an integer in [0, {num_classes}), found {label_text!r}")
    path = resolve(rel)
    if os.path.isabs(rel) or not path.is_relative_to(resolve.root):
        raise StageError(f"{where}: path {rel!r} is outside the image folder {resolve.root}")
    return path, int(label_text)


def load_image(path: Path, channels: int, size: tuple[int, int] | None = None) -> Image.Image:
    """Open an image as RGB (3 channels) or grayscale (1), checking its size when `size`
    (width, height) is given."""
    converted = decode_image(path, MODES[channels])
    if size is not None and converted.size != size:
        raise StageError(f"{path}: image is {converted.size[0]}x{converted.size[1]}, expected "
                         f"{size[0]}x{size[1]}")
    return converted


def image_array(image: Image.Image) -> np.ndarray:
    """uint8 H x W x C, also for a grayscale image (C = 1)."""
    array = np.asarray(image, dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array


class CsvImageDataset(torch.utils.data.Dataset):
    """Per-sample Dataset over a CSV of `path,label,class_name` rows relative to `root`."""

    def __init__(self, csv_path: Path, root: Path, transform: Callable | None = None,
                 num_classes: int | None = None) -> None:
        self.root = Path(root)
        self.channels = folder_channels(self.root)
        self.classes = read_classes(self.root) if num_classes is None else None
        count = len(self.classes) if self.classes is not None else num_classes
        self.annotations = read_annotations(Path(csv_path), self.root, count)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.annotations.labels)

    def __getitem__(self, index: int) -> tuple[object, int]:
        image = load_image(self.annotations.paths[index], self.channels)
        if self.transform is not None:
            image = self.transform(image)
        return image, self.annotations.labels[index]


def _decode_chunk(task: tuple[list[Path], tuple[int, int], int]) -> np.ndarray:
    """Decode a list of images to one uint8 N x H x W x C array (runs in a worker process)."""
    paths, size, channels = task
    return np.stack([image_array(load_image(path, channels, size)) for path in paths])


def decode_split(csv_path: Path, root: Path, num_classes: int,
                 workers: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode every image of a split once: (uint8 N x C x H x W, int64 labels N), C the
    folder's channel count.

    Processes, not threads: a 32x32 PNG decodes in ~0.1 ms, too short for PIL's release of the
    GIL to pay; on 2 cores two threads ran at half the speed of one. All images must share
    the first image's size.
    """
    annotations = read_annotations(csv_path, root, num_classes)
    channels = folder_channels(root)
    size = load_image(annotations.paths[0], channels).size
    paths = annotations.paths
    tasks = [(paths[i:i + DECODE_CHUNK], size, channels) for i in range(0, len(paths), DECODE_CHUNK)]
    with contextlib.ExitStack() as stack:
        chunks = map(_decode_chunk, tasks)
        if workers > 1 and len(tasks) > 1:
            pool = stack.enter_context(multiprocessing.Pool(min(workers, len(tasks))))
            chunks = pool.imap(_decode_chunk, tasks)  # in order
        bar = stack.enter_context(tqdm(total=len(paths), unit="img", desc=f"decode {csv_path.name}",
                                       leave=False, mininterval=1))
        arrays = []
        for chunk in chunks:
            arrays.append(chunk)
            bar.update(len(chunk))
    images = torch.from_numpy(np.concatenate(arrays)).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor(annotations.labels, dtype=torch.int64)


def normalize(images: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 N x C x H x W -> float32, standardized per channel."""
    mean_t = torch.tensor(mean, device=images.device).view(1, -1, 1, 1) * 255
    std_t = torch.tensor(std, device=images.device).view(1, -1, 1, 1) * 255
    return images.to(torch.float32, copy=True).sub_(mean_t).div_(std_t)  # in place: one buffer


def crop_windows(padded: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Every height x width window of each padded image, as a view (no copy): for padding p,
    N x C x (2p + 1) x (2p + 1) x height x width, indexed [image, :, dy, dx]."""
    return padded.unfold(2, height, 1).unfold(3, width, 1)


@dataclass(frozen=True)
class Sampling:
    """How a loader draws its batches: random crops from a `crop_padding`-pixel reflect
    padding, alternating flips, order, whole batches only, the seed, this rank's share, and
    class-balanced draws."""
    crop_padding: int = 0
    flip: bool = False
    shuffle: bool = False
    drop_last: bool = False
    seed: int = 0
    # (rank, world): every rank draws the same global batches (same seed) and keeps its
    # strided share, so the union over ranks is exactly the single-process batch
    shard: tuple[int, int] = (0, 1)
    balanced: bool = False


class BatchLoader:
    """Batches drawn from one normalized tensor on the device: random crops of a reflect-padded
    copy and alternating flips, each batch gathered in one indexing op (no per-sample work).

    Flips alternate (airbench): each image is flipped at random in epoch 0 and the whole set is
    mirrored every other epoch, so every image is seen both ways in any two consecutive epochs.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int,
                 sampling: Sampling) -> None:
        self.images, self.labels = images, labels
        self.rank, self.world = sampling.shard
        self.batch_size, self.shuffle, self.drop_last = batch_size, sampling.shuffle, sampling.drop_last
        self.crop_padding, self.flip = sampling.crop_padding, sampling.flip
        # balanced: each epoch draws len(labels) images with replacement, each with probability
        # 1 / (its class's count), so every class is drawn equally often (WeightedRandomSampler's
        # idea, as one multinomial draw: no per-sample Python)
        self.draw_weights = class_balance(labels)[labels].cpu() if sampling.balanced else None
        # CPU generator: its stream is the same on every device, so runs reproduce anywhere.
        self.generator = torch.Generator().manual_seed(sampling.seed)
        self.epoch = 0
        # example selection (loop.Training): the indices an epoch draws from; None draws all
        self.subset: torch.Tensor | None = None
        # epoch 0's flips, one per image, drawn first from the generator
        self.flipped = torch.rand(len(labels), generator=self.generator) < 0.5 if self.flip else None
        self.hold(images)

    def hold(self, images: torch.Tensor) -> None:
        """Keep the whole set as epoch 0 draws it: flipped where drawn, reflect-padded once."""
        self.base = images
        if self.flipped is not None:
            mask = self.flipped.to(images.device).view(-1, 1, 1, 1)
            self.base = torch.where(mask, images.flip(-1), images)
        if self.crop_padding:
            self.base = F.pad(self.base, (self.crop_padding,) * 4, mode="reflect")
            self.windows = crop_windows(self.base, *images.shape[-2:])

    def __len__(self) -> int:
        return self.batches(len(self.labels) if self.subset is None else len(self.subset))

    def batches(self, examples: int) -> int:
        """The batches an epoch over `examples` images yields."""
        count = examples / self.batch_size
        return math.floor(count) if self.drop_last else math.ceil(count)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels, _ in self.indexed():
            yield images, labels

    def indexed(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The epoch's batches with the set indices of their images."""
        shifts, mirror, indices = self.plan()
        for index in indices:
            yield self.batch(index, shifts, mirror), self.labels[index], index

    def plan(self) -> tuple[torch.Tensor | None, bool, list[torch.Tensor]]:
        """An epoch's random draws, all at its start: crop offsets, whether the set is mirrored,
        and each batch's set indices (this rank's share)."""
        n = len(self.labels)
        # A whole epoch's crop offsets and order at once, from the CPU generator (see above).
        shifts = None
        if self.crop_padding:
            shifts = torch.randint(0, 2 * self.crop_padding + 1, (n, 2), generator=self.generator)
            shifts = shifts.to(self.images.device)
        if self.draw_weights is not None:
            order = torch.multinomial(self.draw_weights, n, replacement=True, generator=self.generator)
        elif self.subset is not None:
            # the permutation from the CPU generator (see above), the subset indexed where it lives
            perm = torch.randperm(len(self.subset), generator=self.generator)
            order = self.subset[perm.to(self.subset.device)]
        else:
            order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        order = order.to(self.images.device)
        mirror = self.flip and self.epoch % 2 == 1
        self.epoch += 1
        return shifts, mirror, [order[i * self.batch_size:(i + 1) * self.batch_size][self.rank::self.world]
                                for i in range(len(self))]

    def batch(self, index: torch.Tensor, shifts: torch.Tensor | None, mirror: bool) -> torch.Tensor:
        """Images `index`, each cropped at its own offset by one gather from the windows view:
        only the batch's bytes move, with no per-epoch copy of the whole set."""
        if shifts is None:
            images = self.base[index]
        else:
            images = self.windows[index, :, shifts[index, 0], shifts[index, 1]]
        return images.flip(-1) if mirror else images


def class_balance(labels: torch.Tensor) -> torch.Tensor:
    """Per class: n / (classes present x its count), scikit-learn's "balanced" weights; 1 for
    every class when they are equally frequent. Indexed by label (absent classes: unused)."""
    counts = torch.bincount(labels.cpu())
    present = int((counts > 0).sum())
    return (len(labels) / (present * counts.clamp_min(1).double())).float().to(labels.device)


def to_device(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move a whole split once; pinned + non-blocking on CUDA, channels_last everywhere."""
    if device.type == "cuda":
        images = images.pin_memory().to(device, non_blocking=True)
    else:
        images = images.to(device)
    return images.contiguous(memory_format=torch.channels_last)


class Pack:
    """A split's packed images (preprocess's <split>.npy, stages/lib/folder.py), read by rows.

    Rows are copied out of a read-only memory map, which then drops its pages: a page a map has
    touched counts as the process's own memory until it is dropped, so an epoch streamed
    through a plain map would grow the process to the file's size. Dropped, the pages stay in
    the kernel's page cache, and the next read maps them again without touching the disk."""

    def __init__(self, root: Path, split: str, num_classes: int) -> None:
        self.path = pack_path(root, split)
        shape, offset = pack_header(self.path)
        self.shape = torch.Size(shape)
        with open(self.path, "rb") as f:
            self.map = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        self.array = np.frombuffer(self.map, np.uint8, math.prod(shape), offset).reshape(shape)
        self.labels = read_labels(labels_path(root, split), len(self), num_classes)

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, index: np.ndarray) -> np.ndarray:
        """uint8 len(index) x C x H x W, a copy of the rows in `index`'s order. Safe from
        several threads at once: a row another thread is copying is mapped again for it."""
        rows = self.array[index]
        self.map.madvise(mmap.MADV_DONTNEED)
        return rows

    def read_all(self) -> np.ndarray:
        return self.read(np.arange(len(self)))


class PackedImages:
    """A split streamed from its pack: normalized images on the device, read as they are asked
    for. It serves the part of a tensor's interface that training and evaluation use: len,
    shape, device, indexing by a slice or an index tensor, and split into batches."""

    def __init__(self, pack: Pack, stats: dict[str, list[float]], device: torch.device) -> None:
        self.pack, self.stats, self.device = pack, stats, device
        self.shape = pack.shape

    def __len__(self) -> int:
        return len(self.pack)

    def size(self, dim: int) -> int:
        return self.shape[dim]

    def __getitem__(self, index: slice | torch.Tensor) -> torch.Tensor:
        rows = (np.arange(len(self))[index] if isinstance(index, slice)
                else index.cpu().numpy())
        return self.normalized(torch.from_numpy(self.pack.read(rows)))

    def normalized(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 images read from the pack, on the device and normalized."""
        if self.device.type == "cuda":
            pixels = pixels.pin_memory().to(self.device, non_blocking=True)
        return normalize(pixels.to(self.device), self.stats["mean"], self.stats["std"])

    def split(self, batch_size: int) -> Iterator[torch.Tensor]:
        """The split in order, `batch_size` at a time, the next batch read while this one is used."""
        starts = range(0, len(self), batch_size)
        yield from prefetched((slice(i, i + batch_size) for i in starts), self.__getitem__, 1)


def prefetched(items: Iterable, load: Callable, workers: int) -> Iterator:
    """load(item) for each item in order, up to workers + 1 of them loading ahead in threads."""
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        ahead: collections.deque = collections.deque()
        for item in items:
            ahead.append(pool.submit(load, item))
            if len(ahead) > workers:
                yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()


class StreamLoader(BatchLoader):
    """BatchLoader's batches, the same for the same seed, read from a split's pack as they are
    needed (`workers` threads loading ahead of the step) instead of held in memory: for a set
    larger than the memory budget. Each rank reads its own share only."""

    def __init__(self, images: PackedImages, labels: torch.Tensor, batch_size: int,
                 sampling: Sampling, workers: int) -> None:
        self.workers = workers
        super().__init__(images, labels, batch_size, sampling)  # type: ignore[arg-type]

    def hold(self, images: PackedImages) -> None:
        """Nothing held: each batch is flipped and padded as it is read."""

    def indexed(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        shifts, mirror, indices = self.plan()
        batches = prefetched(indices, lambda index: self.batch(index, shifts, mirror), self.workers)
        for index, images in zip(indices, batches):
            yield images, self.labels[index], index

    def batch(self, index: torch.Tensor, shifts: torch.Tensor | None, mirror: bool) -> torch.Tensor:
        """BatchLoader.batch's images, from the pack: each output pixel's source row and column
        worked out (epoch 0's flip, the reflect-padded crop's shift, the epoch's mirror), then
        one gather of the uint8 pixels and one normalization, instead of a pass over the batch
        in float for each augmentation."""
        rows = index.cpu()
        pixels = torch.from_numpy(self.images.pack.read(rows.numpy()))  # B x C x H x W uint8
        count, _, height, width = pixels.shape
        ys = torch.arange(height).expand(count, height)
        xs = torch.arange(width).expand(count, width)
        if mirror:
            xs = xs.flip(1)
        if shifts is not None:
            shift = shifts[index].cpu() - self.crop_padding
            ys, xs = reflect(ys + shift[:, :1], height), reflect(xs + shift[:, 1:], width)
        if self.flipped is not None:
            xs = torch.where(self.flipped[rows].view(-1, 1), width - 1 - xs, xs)
        source = (ys.unsqueeze(2) * width + xs.unsqueeze(1)).view(count, 1, -1)
        flat = pixels.view(count, pixels.size(1), -1)
        picked = torch.gather(flat, 2, source.expand(-1, flat.size(1), -1))
        return self.images.normalized(picked.view(pixels.shape))


def reflect(positions: torch.Tensor, size: int) -> torch.Tensor:
    """Positions up to size - 1 outside [0, size) mirrored back in, as F.pad's reflect mode
    (the edge itself not repeated)."""
    positions = positions.abs()
    return torch.where(positions >= size, 2 * (size - 1) - positions, positions)


Images = torch.Tensor | PackedImages  # a split in memory, or streamed from its pack


@dataclass(frozen=True)
class Data:
    """The splits a training stage needs, normalized on the device or streamed from their packs."""
    classes: list[str]
    normalization: dict[str, list[float]]
    train_images: Images
    train_labels: torch.Tensor
    val: tuple[Images, torch.Tensor] | None
    fingerprint: str  # of the labels: a checkpoint from other data is not resumed


def read_labels(path: Path, count: int, num_classes: int) -> torch.Tensor:
    """A pack's labels (<split>-labels.npy), checked against its length and the classes."""
    try:
        labels = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise StageError(f"{path}: not found; run `dvc repro preprocess`") from None
    except (ValueError, OSError) as err:
        raise StageError(f"{path}: not a readable .npy ({err}); run `dvc repro preprocess`") from None
    if labels.dtype != np.int64 or labels.shape != (count,):
        raise StageError(f"{path}: expected {count} int64 labels, one per image of its pack, found "
                         f"{labels.dtype} {labels.shape}; run `dvc repro preprocess`")
    if count and not 0 <= labels.min() <= labels.max() < num_classes:
        raise StageError(f"{path}: a label outside [0, {num_classes}); run `dvc repro preprocess`")
    return torch.from_numpy(labels)


# Bytes per pixel value an in-memory split takes: the uint8 read, its float32 copy, and for
# training the flipped and the padded float32 copies the batches are gathered from.
IN_MEMORY_BYTES = {"train": 1 + 4 + 4 + 4, "val": 1 + 4}


def load_split(pack: Pack, stats: dict[str, list[float]], device: torch.device,
               stream: bool) -> tuple[Images, torch.Tensor]:
    labels = pack.labels.to(device)
    if stream:
        return PackedImages(pack, stats, device), labels
    images = to_device(torch.from_numpy(pack.read_all()), device)
    return normalize(images, stats["mean"], stats["std"]), labels


def load_data(root: Path, device: torch.device, budget: int) -> Data:
    """The training and validation splits: in memory on the device when their copies fit
    `budget` bytes, else streamed from their packs."""
    classes = read_classes(root)
    stats = read_normalization(root)
    packs = {split: Pack(root, split, len(classes)) for split in ("train", "val")
             if split == "train" or pack_path(root, split).exists()}
    needed = sum(math.prod(pack.shape) * IN_MEMORY_BYTES[split] for split, pack in packs.items())
    stream = needed > budget
    print(f"data: {'streamed from the packs' if stream else 'in memory'}: the splits take "
          f"{needed / 2 ** 20:.0f} MiB in memory, the budget is {budget / 2 ** 20:.0f} MiB "
          "(train.memory_budget)")
    train = load_split(packs["train"], stats, device, stream)
    val = load_split(packs["val"], stats, device, stream) if "val" in packs else None
    digest = hashlib.sha256((root / NORMALIZATION_FILE).read_bytes())
    for pack in packs.values():
        digest.update(pack.labels.numpy().tobytes())
    return Data(classes, stats, *train, val, digest.hexdigest())
