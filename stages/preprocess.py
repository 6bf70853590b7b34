"""preprocess: data/extracted/<dataset>/ -> data/images/

usage: python -m stages.preprocess SOURCE_DIR OUT_DIR

Writes OUT_DIR/{train,val,test}/<class>/<index>.png (RGB, or 1-channel for grayscale data),
OUT_DIR/{train,val,test}.csv, and classes.json and normalization.json (one value per channel),
as stages/folder.py lays the folder out. The source files are untrusted. CIFAR pickles are read
by a restricted unpickler that admits only the numpy globals a batch needs, then checked; IDX
files (MNIST-style) are checked field by field: magic, dimensions, counts matching between
images and labels, exact length, labels in range.
"""
from __future__ import annotations

import csv
import io
import json
import math
import multiprocessing
import pickle
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from stages.datasets import DATASETS, IDX_FILES, Dataset, read_idx_header
from stages.folder import CLASSES_FILE, CSV_HEADER, NORMALIZATION_FILE
from stages.outputs import StageError, atomic_dir, stage_main
from stages.params import PreprocessParams, load_params

CIFAR_SHAPE = (3, 32, 32)  # a row holds the R plane, then G, then B, each 32x32 row-major
ROW_BYTES = math.prod(CIFAR_SHAPE)
CLASS_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # class names become folder names
PNG_COMPRESS_LEVEL = 1  # lossless at every level; 1 encodes fastest for 32x32 images
CHUNK = 500  # images per task sent to an encoding process

# numpy's array reconstructor, found through numpy itself: the pickles may spell its module
# numpy.core.multiarray (numpy 1.x, the official files) or numpy._core.multiarray (numpy 2.x).
_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(0))[0]
ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class BatchUnpickler(pickle.Unpickler):
    """Admits only the numpy globals of a CIFAR batch; every other global is refused."""

    def __init__(self, file: io.BufferedIOBase, source: Path) -> None:
        super().__init__(file, encoding="bytes")
        self.source = source

    def find_class(self, module: str, name: str) -> object:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise StageError(f"{self.source}: refuses to load global {module}.{name}; a CIFAR batch "
                             "holds only numpy arrays. The file is not a genuine CIFAR batch: "
                             "delete data/raw and data/extracted and run `dvc repro`") from None


def load_pickle(path: Path) -> dict[str, object]:
    """Unpickle a batch file with BatchUnpickler; keys come back as str."""
    if not path.is_file():
        raise StageError(f"{path}: not found; run `dvc repro extract`")
    try:
        with open(path, "rb") as f:
            obj = BatchUnpickler(f, path).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError,
            AttributeError) as err:
        raise StageError(f"{path}: not a readable pickle ({type(err).__name__}: {err})") from None
    if not isinstance(obj, dict):
        raise StageError(f"{path}: expected a dict, found {type(obj).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in obj.items()}


def read_class_names(path: Path, key: str) -> list[str]:
    meta = load_pickle(path)
    names = meta.get(key)
    if not isinstance(names, list) or not names:
        raise StageError(f"{path}: expected key {key!r} with a list of class names")
    decoded = [n.decode("latin1") if isinstance(n, bytes) else n for n in names]
    for name in decoded:
        if not isinstance(name, str) or not CLASS_NAME.fullmatch(name):
            raise StageError(f"{path}: class name {name!r} is not 1-64 of [A-Za-z0-9_-]")
    if len(set(decoded)) != len(decoded):
        raise StageError(f"{path}: duplicate class names in {decoded}")
    return decoded


def read_batch(path: Path, num_classes: int, labels_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Return (uint8 images N x 3 x 32 x 32, int64 labels N) after checking keys, dtype, shape
    and labels."""
    batch = load_pickle(path)
    for key in ("data", labels_key):
        if key not in batch:
            raise StageError(f"{path}: missing key {key!r}; found {sorted(batch)}")
    data, labels = batch["data"], batch[labels_key]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        found = data.dtype if isinstance(data, np.ndarray) else type(data).__name__
        raise StageError(f"{path}: 'data' must be a uint8 array, found {found}")
    if data.ndim != 2 or data.shape[1] != ROW_BYTES or data.shape[0] == 0:
        raise StageError(f"{path}: 'data' must have shape (N, {ROW_BYTES}), found {data.shape}")
    if not isinstance(labels, list) or not all(type(v) is int for v in labels):
        raise StageError(f"{path}: {labels_key!r} must be a list of ints")
    if len(labels) != len(data):
        raise StageError(f"{path}: {len(labels)} labels for {len(data)} images")
    labels_array = np.asarray(labels, dtype=np.int64)
    check_labels(labels_array, num_classes, path)
    return data.reshape(len(data), *CIFAR_SHAPE), labels_array


def check_labels(labels: np.ndarray, num_classes: int, path: Path) -> None:
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        raise StageError(f"{path}: label {labels[bad[0]]} at row {bad[0]} is outside "
                         f"[0, {num_classes}) ({len(bad)} such rows)")


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes with `ndim` dimensions, its length exactly the header's."""
    if not path.is_file():
        raise StageError(f"{path}: not found; run `dvc repro extract`")
    with open(path, "rb") as f:
        dims, header = read_idx_header(f, path)
        if len(dims) != ndim or 0 in dims:
            raise StageError(f"{path}: IDX dimensions {dims}; expected {ndim} non-zero ones "
                             f"({'images, rows, columns' if ndim == 3 else 'labels'})")
        body = f.read()
    if len(body) != math.prod(dims):
        raise StageError(f"{path}: {len(header) + len(body)} bytes; its header {dims} declares "
                         f"{len(header) + math.prod(dims)}: truncated or padded")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def read_idx_pair(images_path: Path, labels_path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images N x 1 x H x W, int64 labels N) from an IDX images file and its labels file."""
    images, labels = read_idx(images_path, 3), read_idx(labels_path, 1).astype(np.int64)
    if len(images) != len(labels):
        raise StageError(f"{labels_path}: {len(labels)} labels for the {len(images)} images of "
                         f"{images_path}; the two files do not belong together")
    check_labels(labels, num_classes, labels_path)
    return images[:, None], labels


@dataclass(frozen=True)
class Source:
    """A data set as read: training and test images (uint8 N x C x H x W) and labels."""
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: list[str]


def read_source(folder: Path, dataset: Dataset) -> Source:
    if dataset.format == "idx":
        classes = list(dataset.classes)
        files = [folder / name.removesuffix(".gz") for name in IDX_FILES]
        train = read_idx_pair(files[0], files[1], len(classes))
        test = read_idx_pair(files[2], files[3], len(classes))
        if train[0].shape[1:] != test[0].shape[1:]:
            raise StageError(f"{files[2]}: images of {test[0].shape[2:]} pixels; the training "
                             f"images are {train[0].shape[2:]}")
        return Source(*train, *test, classes)
    classes = read_class_names(folder / dataset.meta, dataset.names_key)
    loaded = [read_batch(folder / name, len(classes), dataset.labels_key) for name in dataset.train]
    test = read_batch(folder / dataset.test, len(classes), dataset.labels_key)
    return Source(np.concatenate([images for images, _ in loaded]),
                  np.concatenate([labels for _, labels in loaded]), *test, classes)


def stratified_val(labels: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask choosing round(count * val_fraction) images of each class, seeded."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        take = int(round(len(members) * val_fraction))
        mask[rng.permutation(members)[:take]] = True
    return mask


@dataclass(frozen=True)
class Split:
    name: str
    images: np.ndarray  # uint8 N x C x H x W
    labels: np.ndarray  # int64 N
    indices: np.ndarray  # the image's index in its source batches: it names the file


def relative_paths(split: Split, classes: list[str]) -> list[str]:
    return [f"{split.name}/{classes[label]}/{index}.png"
            for label, index in zip(split.labels.tolist(), split.indices.tolist())]


def encode_pngs(task: tuple[np.ndarray, list[str], Path]) -> int:
    """Write one chunk of images as PNGs under root (runs in a worker process): RGB for 3
    channels, 8-bit grayscale for 1."""
    images, paths, root = task
    for pixels, rel in zip(images, paths):
        image = Image.fromarray(pixels[0] if len(pixels) == 1 else pixels.transpose(1, 2, 0))
        image.save(root / rel, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return len(paths)


def chunks(split: Split, paths: list[str], root: Path) -> Iterator[tuple[np.ndarray, list[str], Path]]:
    for start in range(0, len(paths), CHUNK):
        yield split.images[start:start + CHUNK], paths[start:start + CHUNK], root


def write_images(splits: list[Split], classes: list[str], root: Path, workers: int) -> None:
    """Encode every split's PNGs with `workers` processes, and write its CSV."""
    tasks = []
    for split in splits:
        for name in classes:
            (root / split.name / name).mkdir(parents=True)
        paths = relative_paths(split, classes)
        write_csv(root / f"{split.name}.csv", paths, split.labels, classes)
        tasks.extend(chunks(split, paths, root))
    total = sum(len(s.labels) for s in splits)
    with tqdm(total=total, unit="img", desc="png") as bar:
        if workers == 1:
            for task in tasks:
                bar.update(encode_pngs(task))
            return
        with multiprocessing.Pool(workers) as pool:
            for done in pool.imap_unordered(encode_pngs, tasks):
                bar.update(done)


def write_csv(path: Path, paths: list[str], labels: np.ndarray, classes: list[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_HEADER)
        for rel, label in zip(paths, labels.tolist()):
            writer.writerow([rel, label, classes[label]])


def channel_stats(images: np.ndarray) -> dict[str, list[float]]:
    """Per-channel mean and std of uint8 N x C x H x W images, in [0, 1] units."""
    planes = images.reshape(len(images), images.shape[1], -1).astype(np.float64) / 255
    return {"mean": planes.mean(axis=(0, 2)).tolist(), "std": planes.std(axis=(0, 2)).tolist()}


def kept(labels: np.ndarray, train: np.ndarray, keep: dict[str, float], classes: list[str],
         seed: int) -> np.ndarray:
    """The training mask less, for each class in `keep`, all but that share of its images
    (seeded): a deliberately imbalanced training split."""
    unknown = sorted(set(keep) - set(classes))
    if unknown:
        raise StageError(f"preprocess.keep: unknown class(es) {unknown}; the classes are {classes}")
    rng = np.random.default_rng([seed, 1])  # a stream of its own: the val split stays as it was
    train = train.copy()
    for name, share in keep.items():
        members = np.flatnonzero(train & (labels == classes.index(name)))
        train[rng.permutation(members)[int(round(len(members) * share)):]] = False
    return train


def build_splits(source: Source, params: PreprocessParams) -> list[Split]:
    images, labels = source.train_images, source.train_labels
    val = stratified_val(labels, params.val_fraction, params.seed)
    train = kept(labels, ~val, params.keep, source.classes, params.seed)
    index = np.arange(len(labels))
    splits = [Split("train", images[train], labels[train], index[train])]
    if val.any():
        splits.append(Split("val", images[val], labels[val], index[val]))
    splits.append(Split("test", source.test_images, source.test_labels,
                        np.arange(len(source.test_labels))))
    return splits


def preprocess(source_dir: Path, out: Path, params: PreprocessParams, dataset: Dataset) -> None:
    source = read_source(source_dir, dataset)
    classes = source.classes
    splits = build_splits(source, params)
    with atomic_dir(out) as tmp:
        write_images(splits, classes, tmp, params.workers)
        (tmp / CLASSES_FILE).write_text(json.dumps(classes) + "\n")
        stats = channel_stats(splits[0].images)
        (tmp / NORMALIZATION_FILE).write_text(json.dumps(stats, indent=2) + "\n")
    counts = ", ".join(f"{s.name} {len(s.labels)}" for s in splits)
    print(f"preprocess: wrote {counts} images and CSVs to {out}")


@stage_main
def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    params = load_params()
    preprocess(Path(sys.argv[1]), Path(sys.argv[2]), params.preprocess,
               DATASETS[params.download.dataset])


if __name__ == "__main__":
    main()
