"""preprocess: data/extracted/<dataset>/ -> data/images/

usage: python -m stages.preprocess SOURCE_DIR OUT_DIR [PACKED_DIR]

Writes OUT_DIR/{train,val,test}/<class>/<index>.png (RGB, or 1-channel for grayscale data),
OUT_DIR/{train,val,test}.csv, each split packed with its labels into PACKED_DIR (default:
OUT_DIR), and classes.json and normalization.json (one value per channel) into both, as
stages/lib/folder.py lays the folders out. Every
image is decoded once: `preprocess.channels` and `preprocess.size` fit it (a person's folder of
mixed sizes needs a size), and a source without a test split gets one carved
(`preprocess.test_fraction`). The source files are untrusted. CIFAR pickles are read
by a restricted unpickler that admits only the numpy globals a batch needs, then checked; IDX
files (MNIST-style) are checked field by field: magic, dimensions, counts matching between
images and labels, exact length, labels in range.
"""
from __future__ import annotations

from stages.lib.params import preflight

preflight(__name__, __doc__)  # --help, and bad params.yaml, answered before the slow imports

import contextlib
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
from multiprocessing.pool import Pool
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from stages.lib.datasets import DATASETS, IDX_FILES, Dataset, read_idx_header
from stages.lib.folder import (CLASSES_FILE, CSV_HEADER, MODES, NORMALIZATION_FILE, decode_image,
                               labels_path, open_image, pack_path)
from stages.lib.imagefolder import list_folder
from stages.lib.outputs import StageError, atomic_dir, stage_main
from stages.lib.params import PreprocessParams, load_params

CIFAR_SHAPE = (3, 32, 32)  # a row holds the R plane, then G, then B, each 32x32 row-major
ROW_BYTES = math.prod(CIFAR_SHAPE)
CLASS_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # class names become folder names
PNG_COMPRESS_LEVEL = 1  # lossless at every level; 1 encodes fastest for 32x32 images
CHUNK_BYTES = 2 << 20  # pixels per task sent to an encoding process (682 CIFAR images)

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
    """A data set as read: training and test images and labels. Images are uint8
    N x C x H x W arrays (CIFAR, IDX), or object arrays of image files (a person's folder)."""
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray | None  # None: the source has no test split; preprocess carves one
    test_labels: np.ndarray | None
    classes: list[str]


def read_source(folder: Path, dataset: Dataset) -> Source:
    if dataset.format == "folder":
        return read_folder(folder)
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


def read_folder(folder: Path) -> Source:
    """A person's folder (stages/lib/imagefolder.py): its image files and their labels."""
    listing = list_folder(folder)
    if listing.skipped:
        shown = ", ".join(str(p.relative_to(folder)) for p in listing.skipped[:5])
        print(f"preprocess: skipped {len(listing.skipped)} file(s) that are not images: {shown}"
              + (", ..." if len(listing.skipped) > 5 else ""))

    def arrays(split: str) -> tuple[np.ndarray, np.ndarray] | tuple[None, None]:
        if split not in listing.splits:
            return None, None
        files = np.empty(len(listing.splits[split]), dtype=object)
        files[:] = [path for path, _ in listing.splits[split]]
        return files, np.array([label for _, label in listing.splits[split]], dtype=np.int64)

    return Source(*arrays("train"), *arrays("test"), listing.classes)


def stratified_val(labels: np.ndarray, val_fraction: float, seed: int | list[int]) -> np.ndarray:
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
    images: np.ndarray  # uint8 N x C x H x W, or the N image files (object array of Paths)
    labels: np.ndarray  # int64 N
    indices: np.ndarray  # the image's index in its source: it names the file


@dataclass(frozen=True)
class Fit:
    """What every image becomes: its channels (1 or 3) and (height, width), None: its own."""
    channels: int
    size: tuple[int, int] | None

    @property
    def mode(self) -> str:
        return MODES[self.channels]


def relative_paths(split: Split, classes: list[str]) -> list[str]:
    return [f"{split.name}/{classes[label]}/{index}.png"
            for label, index in zip(split.labels.tolist(), split.indices.tolist())]


def fit_image(image: Image.Image, fit: Fit) -> np.ndarray:
    """An image in `fit`'s mode, resized by its shorter side and center-cropped to `fit`'s
    size where it has one, as uint8 C x H x W."""
    if image.mode != fit.mode:
        image = image.convert(fit.mode)
    if fit.size is not None and image.size != fit.size[::-1]:
        height, width = fit.size
        scale = max(height / image.height, width / image.width)
        scaled = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
        image = image.resize(scaled, Image.BILINEAR, reducing_gap=3.0)  # antialiased when shrinking
        left, top = (scaled[0] - width) // 2, (scaled[1] - height) // 2
        image = image.crop((left, top, left + width, top + height))
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def as_image(item: np.ndarray | Path, fit: Fit) -> Image.Image:
    """A source image as PIL's: a file decoded (JPEG at the smallest scale still covering
    `fit.size`), or an array's pixels."""
    if isinstance(item, Path):
        return decode_image(item, fit.mode, None if fit.size is None else fit.size[::-1])
    return Image.fromarray(item[0] if len(item) == 1 else item.transpose(1, 2, 0))


def encode_chunk(task: tuple[np.ndarray, list[str], Path, Fit]) -> np.ndarray:
    """Fit one chunk of images, write each as a PNG under root (runs in a worker process),
    and return them as uint8 N x C x H x W for the pack."""
    items, paths, root, fit = task
    out = []
    for item, rel in zip(items, paths):
        pixels = fit_image(as_image(item, fit), fit)
        image = Image.fromarray(pixels[0] if fit.channels == 1 else pixels.transpose(1, 2, 0))
        image.save(root / rel, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        out.append(pixels)
    return np.stack(out)


def chunks(split: Split, paths: list[str], root: Path, fit: Fit,
           shape: tuple[int, int, int]) -> Iterator[tuple[np.ndarray, list[str], Path, Fit]]:
    step = max(1, CHUNK_BYTES // math.prod(shape))
    for start in range(0, len(paths), step):
        yield split.images[start:start + step], paths[start:start + step], root, fit


class ChannelSums:
    """Per-channel sums of pixels and squares, gathered chunk by chunk in float64: the mean and
    std without the whole split in float64 at once."""

    def __init__(self, channels: int) -> None:
        self.count = 0
        self.sums = np.zeros((2, channels))

    def add(self, images: np.ndarray) -> None:
        planes = images.reshape(len(images), images.shape[1], -1).astype(np.float64) / 255
        self.sums += [planes.sum(axis=(0, 2)), np.square(planes).sum(axis=(0, 2))]
        self.count += planes.shape[0] * planes.shape[2]

    def stats(self) -> dict[str, list[float]]:
        mean = self.sums[0] / self.count
        std = np.sqrt(np.maximum(self.sums[1] / self.count - mean ** 2, 0))
        return {"mean": mean.tolist(), "std": std.tolist()}


def write_split(split: Split, classes: list[str], roots: tuple[Path, Path], fit: Fit,
                pool: Pool | None, bar: tqdm) -> ChannelSums:
    """A split's PNGs and CSV under roots[0], its pack (the PNGs' pixels, in the CSV's order)
    and labels under roots[1]."""
    root, packed = roots
    for name in classes:
        (root / split.name / name).mkdir(parents=True)
    paths = relative_paths(split, classes)
    write_csv(root / f"{split.name}.csv", paths, split.labels, classes)
    shape = (fit.channels, *(fit.size or split.images.shape[2:]))
    tasks = chunks(split, paths, root, fit, shape)
    sums = ChannelSums(fit.channels)
    np.save(labels_path(packed, split.name), split.labels.astype(np.int64))
    with open(pack_path(packed, split.name), "wb") as pack:
        np.lib.format.write_array_header_1_0(pack, {"descr": "|u1", "fortran_order": False,
                                                    "shape": (len(paths), *shape)})
        for images in (pool.imap(encode_chunk, tasks) if pool else map(encode_chunk, tasks)):
            if images.shape[1:] != shape:
                raise StageError(f"{root / split.name}: an image of {images.shape[2:]} pixels among "
                                 f"{shape[1:]}; set preprocess.size to [height, width]")
            pack.write(images.tobytes())
            sums.add(images)
            bar.update(len(images))
    return sums


def write_images(splits: list[Split], classes: list[str], roots: tuple[Path, Path], fit: Fit,
                 pool: Pool | None) -> dict[str, list[float]]:
    """Encode every split's PNGs in `pool`'s processes (None: in this one), and write its CSV
    (under roots[0]) and pack (under roots[1], which may be the same folder); returns the
    training split's normalization."""
    with tqdm(total=sum(len(s.labels) for s in splits), unit="img", desc="png + pack") as bar:
        sums = [write_split(split, classes, roots, fit, pool, bar) for split in splits]
    return sums[0].stats()


def write_csv(path: Path, paths: list[str], labels: np.ndarray, classes: list[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_HEADER)
        for rel, label in zip(paths, labels.tolist()):
            writer.writerow([rel, label, classes[label]])


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


def with_test(source: Source, params: PreprocessParams) -> Source:
    """The source with a test split: its own, or a stratified `test_fraction` carved from the
    training images (seeded, a stream apart from the validation split's)."""
    if source.test_images is not None:
        return source
    test = stratified_val(source.train_labels, params.test_fraction, [params.seed, 2])
    images, labels = source.train_images, source.train_labels
    return Source(images[~test], labels[~test], images[test], labels[test], source.classes)


def build_splits(source: Source, params: PreprocessParams) -> list[Split]:
    source = with_test(source, params)
    images, labels = source.train_images, source.train_labels
    val = stratified_val(labels, params.val_fraction, params.seed)
    train = kept(labels, ~val, params.keep, source.classes, params.seed)
    counts = np.bincount(labels[train], minlength=len(source.classes))
    if not counts.all():
        name = source.classes[int(np.argmin(counts))]
        raise StageError(f"preprocess: class {name!r} has no training image left after the test "
                         "and validation splits; add images of it, or lower "
                         "preprocess.test_fraction and val_fraction")
    index = np.arange(len(labels))
    splits = [Split("train", images[train], labels[train], index[train])]
    if val.any():
        splits.append(Split("val", images[val], labels[val], index[val]))
    splits.append(Split("test", source.test_images, source.test_labels,
                        np.arange(len(source.test_labels))))
    return splits


GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


def image_header(path: Path) -> tuple[tuple[int, int], str]:
    """(width, height) and PIL mode from a file's header (runs in a worker process)."""
    with open_image(path) as image:
        return image.size, image.mode


def plan_fit(source: Source, params: PreprocessParams, pool: Pool | None) -> Fit:
    """The channels and size every image becomes. Array sources keep their own unless params
    say otherwise; a folder's headers are read first (every bomb refused before any decoding):
    `channels: auto` is 1 only if every image is grayscale, and without `size` all must agree."""
    size = tuple(params.size) if params.size else None
    if source.train_images.dtype != object:
        channels = source.train_images.shape[1] if params.channels == "auto" else params.channels
        return Fit(channels, size)
    files = [*source.train_images, *source.test_images] if source.test_images is not None \
        else list(source.train_images)
    headers = pool.imap(image_header, files, chunksize=64) if pool else map(image_header, files)
    first, gray = None, True
    for path, (dims, mode) in zip(files, tqdm(headers, total=len(files), desc="headers", leave=False)):
        gray = gray and mode in GRAY_MODES
        first = first or (path, dims)
        if size is None and dims != first[1]:
            raise StageError(f"{path}: {dims[0]}x{dims[1]} pixels, but {first[0]} is "
                             f"{first[1][0]}x{first[1][1]}; set preprocess.size to [height, "
                             "width] to resize the images to one size")
    channels = (1 if gray else 3) if params.channels == "auto" else params.channels
    return Fit(channels, size or first[1][::-1])


def preprocess(source_dir: Path, out: Path, params: PreprocessParams, dataset: Dataset,
               packed: Path | None = None) -> None:
    """The image folder into `out`, its packs into `packed` (None: into `out` too)."""
    source = read_source(source_dir, dataset)
    splits = build_splits(source, params)
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(atomic_dir(out))
        tmp_packed = stack.enter_context(atomic_dir(packed)) if packed else tmp
        pool = stack.enter_context(multiprocessing.Pool(params.workers)) if params.workers > 1 else None
        fit = plan_fit(source, params, pool)
        stats = write_images(splits, source.classes, (tmp, tmp_packed), fit, pool)
        for folder in {tmp, tmp_packed}:
            (folder / CLASSES_FILE).write_text(json.dumps(source.classes) + "\n")
            (folder / NORMALIZATION_FILE).write_text(json.dumps(stats, indent=2) + "\n")
    counts = ", ".join(f"{s.name} {len(s.labels)}" for s in splits)
    shape = f"{fit.channels} x {fit.size[0]} x {fit.size[1]}" if fit.size else "their own size"
    print(f"preprocess: wrote {counts} images ({shape}), CSVs and packs to {out}")


@stage_main
def main() -> None:
    if len(sys.argv) not in (3, 4):
        raise SystemExit(__doc__)
    params = load_params()
    paths = [Path(arg) for arg in sys.argv[1:]]
    preprocess(paths[0], paths[1], params.preprocess, DATASETS[params.download.dataset],
               paths[2] if len(paths) == 3 else None)


if __name__ == "__main__":
    main()
