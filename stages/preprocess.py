"""preprocess: data/extracted/cifar-10-batches-py/ -> data/images/

usage: python -m stages.preprocess BATCHES_DIR OUT_DIR

Writes OUT_DIR/{train,val,test}/<class>/<index>.png, OUT_DIR/{train,val,test}.csv, and
classes.json and normalization.json, as stages/folder.py lays the folder out. The pickles are
untrusted: they are read by a restricted unpickler that admits only the numpy globals a CIFAR
batch needs, then checked.
"""
from __future__ import annotations

import csv
import io
import json
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

from stages.folder import CLASSES_FILE, CSV_HEADER, NORMALIZATION_FILE
from stages.outputs import StageError, atomic_dir, stage_main
from stages.params import PreprocessParams, load_params

TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCH = "test_batch"
META = "batches.meta"
IMAGE_SHAPE = (3, 32, 32)  # a row holds the R plane, then G, then B, each 32x32 row-major
ROW_BYTES = 3 * 32 * 32
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
                             "holds only numpy arrays. The file is not a genuine CIFAR-10 batch: "
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


def read_class_names(path: Path) -> list[str]:
    meta = load_pickle(path)
    names = meta.get("label_names")
    if not isinstance(names, list) or not names:
        raise StageError(f"{path}: expected key 'label_names' with a list of class names")
    decoded = [n.decode("latin1") if isinstance(n, bytes) else n for n in names]
    for name in decoded:
        if not isinstance(name, str) or not CLASS_NAME.fullmatch(name):
            raise StageError(f"{path}: class name {name!r} is not 1-64 of [A-Za-z0-9_-]")
    if len(set(decoded)) != len(decoded):
        raise StageError(f"{path}: duplicate class names in {decoded}")
    return decoded


def read_batch(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (uint8 rows N x 3072, int64 labels N) after checking keys, dtype, shape, labels."""
    batch = load_pickle(path)
    for key in ("data", "labels"):
        if key not in batch:
            raise StageError(f"{path}: missing key {key!r}; found {sorted(batch)}")
    data, labels = batch["data"], batch["labels"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        found = data.dtype if isinstance(data, np.ndarray) else type(data).__name__
        raise StageError(f"{path}: 'data' must be a uint8 array, found {found}")
    if data.ndim != 2 or data.shape[1] != ROW_BYTES or data.shape[0] == 0:
        raise StageError(f"{path}: 'data' must have shape (N, {ROW_BYTES}), found {data.shape}")
    if not isinstance(labels, list) or not all(type(v) is int for v in labels):
        raise StageError(f"{path}: 'labels' must be a list of ints")
    if len(labels) != len(data):
        raise StageError(f"{path}: {len(labels)} labels for {len(data)} images")
    labels_array = np.asarray(labels, dtype=np.int64)
    bad = np.flatnonzero((labels_array < 0) | (labels_array >= num_classes))
    if len(bad):
        raise StageError(f"{path}: label {labels[bad[0]]} at row {bad[0]} is outside "
                         f"[0, {num_classes}) ({len(bad)} such rows)")
    return data, labels_array


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
    rows: np.ndarray  # uint8 N x 3072
    labels: np.ndarray  # int64 N
    indices: np.ndarray  # the image's index in its source batches: it names the file


def relative_paths(split: Split, classes: list[str]) -> list[str]:
    return [f"{split.name}/{classes[label]}/{index}.png"
            for label, index in zip(split.labels.tolist(), split.indices.tolist())]


def encode_pngs(task: tuple[np.ndarray, list[str], Path]) -> int:
    """Write one chunk of rows as PNGs under root (runs in a worker process)."""
    rows, paths, root = task
    for row, rel in zip(rows, paths):
        image = Image.fromarray(row.reshape(IMAGE_SHAPE).transpose(1, 2, 0))
        image.save(root / rel, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return len(paths)


def chunks(split: Split, paths: list[str], root: Path) -> Iterator[tuple[np.ndarray, list[str], Path]]:
    for start in range(0, len(paths), CHUNK):
        yield split.rows[start:start + CHUNK], paths[start:start + CHUNK], root


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


def channel_stats(rows: np.ndarray) -> dict[str, list[float]]:
    """Per-channel mean and std of uint8 rows, in [0, 1] units."""
    planes = rows.reshape(len(rows), 3, -1).astype(np.float64) / 255
    return {"mean": planes.mean(axis=(0, 2)).tolist(), "std": planes.std(axis=(0, 2)).tolist()}


def build_splits(batches: Path, val_fraction: float, seed: int) -> tuple[list[Split], list[str]]:
    classes = read_class_names(batches / META)
    loaded = [read_batch(batches / name, len(classes)) for name in TRAIN_BATCHES]
    rows = np.concatenate([data for data, _ in loaded])
    labels = np.concatenate([lab for _, lab in loaded])
    test_rows, test_labels = read_batch(batches / TEST_BATCH, len(classes))
    val = stratified_val(labels, val_fraction, seed)
    index = np.arange(len(labels))
    splits = [Split("train", rows[~val], labels[~val], index[~val])]
    if val.any():
        splits.append(Split("val", rows[val], labels[val], index[val]))
    splits.append(Split("test", test_rows, test_labels, np.arange(len(test_labels))))
    return splits, classes


def preprocess(batches: Path, out: Path, params: PreprocessParams) -> None:
    splits, classes = build_splits(batches, params.val_fraction, params.seed)
    with atomic_dir(out) as tmp:
        write_images(splits, classes, tmp, params.workers)
        (tmp / CLASSES_FILE).write_text(json.dumps(classes) + "\n")
        stats = channel_stats(splits[0].rows)
        (tmp / NORMALIZATION_FILE).write_text(json.dumps(stats, indent=2) + "\n")
    counts = ", ".join(f"{s.name} {len(s.labels)}" for s in splits)
    print(f"preprocess: wrote {counts} images and CSVs to {out}")


@stage_main
def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    params = load_params()
    preprocess(Path(sys.argv[1]), Path(sys.argv[2]), params.preprocess)


if __name__ == "__main__":
    main()
