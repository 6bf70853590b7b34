"""The data sets the pipeline knows (`download.dataset`): where each officially lives, its
files and checksums, and how its files are laid out. One home for these facts; download,
extract and preprocess read them from here.

Three distribution formats:
- "cifar": one python-pickle tarball (CIFAR-10, CIFAR-100), extracted member by member;
- "idx": four gzip'd IDX files beside each other (MNIST, Fashion-MNIST), each decompressed;
- "folder": a person's own images (`download.dataset: folder`), a folder or a .tar, .tar.gz
  or .zip of one, in the ImageFolder or the CSV layout (stages/lib/imagefolder.py).
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

from stages.lib.outputs import StageError

IDX_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


@dataclass(frozen=True)
class Dataset:
    name: str
    format: Literal["cifar", "idx", "folder"]
    # the tarball (cifar) or the folder holding the four files (idx, ends with /); a folder
    # data set has none: download.url names it
    url: str
    md5: dict[str, str]  # downloaded file name -> md5 of the official bytes (folder: none)
    # cifar: the folder inside the tarball; its training and test batches, its meta member
    # with the class names under `names_key`, the batches' label key; optional members
    folder: str = ""
    train: tuple[str, ...] = ()
    test: str = ""
    meta: str = ""
    names_key: str = ""
    labels_key: str = ""
    optional: tuple[str, ...] = ()
    # idx: class names in label order (a cifar tarball names its classes in its meta member)
    classes: tuple[str, ...] = ()
    # a mirrored image shows the same class (not a digit's): `train.flip` and `train.tta` auto
    # flip its images only then
    flips: bool = True

    @property
    def members(self) -> tuple[str, ...]:
        """The files a CIFAR tarball must hold."""
        return (*self.train, self.test, self.meta)


DATASETS: dict[str, Dataset] = {
    "cifar10": Dataset(
        "cifar10", "cifar", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        {"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"},
        folder="cifar-10-batches-py", train=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test="test_batch", meta="batches.meta", names_key="label_names", labels_key="labels",
        optional=("readme.html",)),
    "cifar100": Dataset(
        "cifar100", "cifar", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        {"cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85"},
        folder="cifar-100-python", train=("train",), test="test", meta="meta",
        names_key="fine_label_names", labels_key="fine_labels", optional=("file.txt~",)),
    # the original host (yann.lecun.com) no longer serves the files; this is torchvision's
    "mnist": Dataset(
        "mnist", "idx", "https://ossci-datasets.s3.amazonaws.com/mnist/",
        dict(zip(IDX_FILES, ("f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
                             "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c"))),
        classes=tuple(str(digit) for digit in range(10)), flips=False),
    "fashion_mnist": Dataset(
        "fashion_mnist", "idx", "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        dict(zip(IDX_FILES, ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
                             "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310"))),
        # the official names, made folder-safe ("T-shirt/top" -> "T-shirt_top")
        classes=("T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                 "Sneaker", "Bag", "Ankle_boot")),
    "folder": Dataset("folder", "folder", "", {}),
}


# IDX (MNIST's format): 2 zero bytes, a type code, the number of dimensions, then each
# dimension as a big-endian uint32, then the items. Only unsigned bytes (0x08) occur here.
IDX_UBYTE = 0x08
MAX_IDX_BYTES = 1 << 30  # far above MNIST's 47 MB; a header claiming more is refused


def read_idx_header(stream: BinaryIO, path: Path) -> tuple[tuple[int, ...], bytes]:
    """(dimensions, header bytes) of an IDX file, reading exactly the header from `stream`."""
    head = stream.read(4)
    if len(head) != 4 or head[:2] != b"\0\0" or head[2] != IDX_UBYTE or not 1 <= head[3] <= 3:
        raise StageError(f"{path}: not an IDX file of unsigned bytes (magic {head.hex()!r}; "
                         f"expected 0000 08 followed by 1-3 dimensions)")
    raw = stream.read(4 * head[3])
    if len(raw) != 4 * head[3]:
        raise StageError(f"{path}: IDX header ends after {4 + len(raw)} bytes")
    dims = struct.unpack(f">{head[3]}I", raw)
    size = 4 + len(raw) + math.prod(dims)
    if size > MAX_IDX_BYTES:
        raise StageError(f"{path}: IDX header declares {dims}, {size} bytes, more than "
                         f"{MAX_IDX_BYTES}; not a data set this pipeline reads")
    return dims, head + raw
