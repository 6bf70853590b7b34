"""Writes tiny data sets in the real MNIST / Fashion-MNIST distribution format: four gzip'd
IDX files (big-endian header: 0x00000803 and counts, rows, columns for images; 0x00000801
and the count for labels; then the raw unsigned bytes)."""
from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np

from stages.lib.datasets import IDX_FILES


def idx_bytes(array: np.ndarray) -> bytes:
    """An uncompressed IDX file of unsigned bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def digit_images(labels: np.ndarray, rng: np.random.Generator, size: int = 28) -> np.ndarray:
    """Grayscale images a model can tell apart: a bright bar whose row is the label, on noise."""
    images = rng.integers(0, 60, size=(len(labels), size, size))
    for image, label in zip(images, labels):
        image[2 + 2 * label: 4 + 2 * label, 4:-4] = 255
    return images.astype(np.uint8)


def idx_payloads(seed: int = 0, train_per_class: int = 12, test_per_class: int = 2,
                 size: int = 28) -> dict[str, bytes]:
    """File name -> uncompressed IDX bytes, for the four files."""
    rng = np.random.default_rng(seed)
    payloads = {}
    for prefix, per_class in (("train", train_per_class), ("t10k", test_per_class)):
        labels = rng.permutation(np.repeat(np.arange(10), per_class))
        payloads[f"{prefix}-images-idx3-ubyte.gz"] = idx_bytes(digit_images(labels, rng, size))
        payloads[f"{prefix}-labels-idx1-ubyte.gz"] = idx_bytes(labels)
    assert list(payloads) == [IDX_FILES[0], IDX_FILES[1], IDX_FILES[2], IDX_FILES[3]]
    return payloads


def write_idx_files(folder: Path, payloads: dict[str, bytes]) -> dict[str, str]:
    """Gzip each payload into `folder` under its file name; returns {file name: md5}."""
    folder.mkdir(parents=True, exist_ok=True)
    md5 = {}
    for name, payload in payloads.items():
        (folder / name).write_bytes(gzip.compress(payload, mtime=0))
        md5[name] = hashlib.md5((folder / name).read_bytes()).hexdigest()
    return md5
