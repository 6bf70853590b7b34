"""The image folder's layout, written by preprocess and read by every stage after it, and the
one guarded way to open an image. Torch-free, so that preprocess does not import torch.

The image folder: {train,val,test}.csv list `path,label,class_name` rows (path relative to the
folder); classes.json holds the class names in label order, normalization.json the train
split's per-channel mean and std.

The packed folder (the same one, or one of its own: data/packed): {split}.npy packs each
split's images, in its CSV's order, as one uint8 N x C x H x W array (numpy's .npy format,
memory-mappable), {split}-labels.npy their int64 labels, beside the same classes.json and
normalization.json. The training stages read it instead of decoding the PNGs again; a few
large files also spare DVC the hashing of a folder of many small ones.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from stages.lib.outputs import StageError

CSV_HEADER = ("path", "label", "class_name")
CLASSES_FILE = "classes.json"
NORMALIZATION_FILE = "normalization.json"
PACK_SUFFIX = ".npy"
# PIL's mode for each channel count a folder (and a model trained on one) may have
MODES = {1: "L", 3: "RGB"}
# Refused from its header, before a pixel is decoded: a 300 KB PNG may declare 50,000 x 50,000
# pixels (7.5 GB as RGB). 64 Mpx holds any camera's photo up to 8,000 x 8,000.
MAX_PIXELS = 64_000_000


def open_image(path: Path) -> Image.Image:
    """Open an image file lazily (its header read, no pixels decoded), refusing a missing,
    unreadable or oversized one with a message naming the file. Use it as a context manager."""
    try:
        image = Image.open(path)
    except FileNotFoundError:
        raise StageError(f"{path}: image file does not exist") from None
    except IsADirectoryError:
        raise StageError(f"{path}: is a folder, not an image file") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise StageError(f"{path}: not a readable image ({err})") from None
    width, height = image.size
    if width * height > MAX_PIXELS or width == 0 or height == 0:
        image.close()
        raise StageError(f"{path}: declares {width} x {height} pixels; images of 1 to {MAX_PIXELS} "
                         "pixels are read (a decompression bomb, or a scan to shrink first)")
    return image


def decode_image(path: Path, mode: str, draft: tuple[int, int] | None = None) -> Image.Image:
    """An image file's pixels in PIL `mode` ("L" or "RGB"), decoded through open_image. With
    `draft` (width, height), a JPEG decodes at the smallest of its 1/2, 1/4, 1/8 scales that
    still covers it: a 12 Mpx photo meant for 128 px decodes 64 times fewer pixels."""
    with open_image(path) as image, warnings.catch_warnings():
        # our own limit is checked by open_image; PIL's warning on large images is no error here
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            if draft is not None:
                image.draft(mode, draft)
            return image.convert(mode)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise StageError(f"{path}: not a readable image ({err})") from None


def pack_path(root: Path, split: str) -> Path:
    return root / f"{split}{PACK_SUFFIX}"


def labels_path(root: Path, split: str) -> Path:
    return root / f"{split}-labels{PACK_SUFFIX}"


def pack_header(path: Path) -> tuple[tuple[int, ...], int]:
    """(shape, byte offset of the pixels) of a pack, checked to be uint8 N x C x H x W in C
    order and as long as its header says."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is None:
                raise ValueError(f".npy format version {version}; expected 1.0 or 2.0")
            shape, fortran, dtype = read_header(f)
            offset = f.tell()
    except FileNotFoundError:
        raise StageError(f"{path}: not found; run `dvc repro preprocess` to write the packed "
                         "images") from None
    except (ValueError, OSError) as err:
        raise StageError(f"{path}: not a readable .npy pack ({err}); run `dvc repro preprocess`") from None
    if dtype != np.uint8 or fortran or len(shape) != 4 or shape[1] not in MODES:
        raise StageError(f"{path}: expected uint8 N x C x H x W (C 1 or 3) in C order, found "
                         f"{dtype} {shape}; run `dvc repro preprocess`")
    expected = offset + int(np.prod(shape))
    if os.path.getsize(path) != expected:
        raise StageError(f"{path}: {os.path.getsize(path)} bytes, its header declares {expected}: "
                         "truncated; run `dvc repro preprocess`")
    return shape, offset
