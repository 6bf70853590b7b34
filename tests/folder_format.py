"""Writes a CSV-annotated image folder directly, as a user's own data would be: any channel
count, size and number of classes, laid out as stages/lib/folder.py says."""
from __future__ import annotations

import csv
import json
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from stages.lib.folder import CLASSES_FILE, CSV_HEADER, NORMALIZATION_FILE, labels_path, pack_path


def write_folder(root: Path, channels: int, size: int, num_classes: int,
                 per_class: dict[str, int], seed: int = 0) -> Path:
    """`per_class` images of each class per split; each class its own brightness per channel
    under noise, so that a model can learn it."""
    rng = np.random.default_rng(seed)
    classes = [f"class_{i:02d}" for i in range(num_classes)]
    train_pixels = []
    for split, count in per_class.items():
        rows, split_pixels, split_labels = [], [], []
        for label, name in enumerate(classes):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for index in range(count):
                level = (np.arange(channels) * 37 + label * 255 // num_classes) % 256
                pixels = np.clip(level[None, None, :] + rng.integers(-40, 41, (size, size, channels)), 0, 255)
                pixels = pixels.astype(np.uint8)
                split_pixels.append(pixels)
                split_labels.append(label)
                if split == "train":
                    train_pixels.append(pixels)
                path = f"{split}/{name}/{index}.png"
                Image.fromarray(pixels[..., 0] if channels == 1 else pixels).save(root / path)
                rows.append([path, label, name])
        with open(root / f"{split}.csv", "w", newline="") as f:
            csv.writer(f).writerows([CSV_HEADER, *rows])
        write_pack(root, split, split_pixels, split_labels)
    stack = np.stack(train_pixels).astype(np.float64) / 255
    (root / CLASSES_FILE).write_text(json.dumps(classes))
    (root / NORMALIZATION_FILE).write_text(json.dumps(
        {"mean": stack.mean(axis=(0, 1, 2)).tolist(), "std": stack.std(axis=(0, 1, 2)).tolist()}))
    return root


def write_pack(root: Path, split: str, pixels: list[np.ndarray], labels: list[int]) -> None:
    """The split's pack, as preprocess writes it: uint8 N x C x H x W in the CSV's order, and
    its labels."""
    np.save(pack_path(root, split), np.stack([p.transpose(2, 0, 1) for p in pixels]))
    np.save(labels_path(root, split), np.array(labels, dtype=np.int64))


CLASSES = ("apple", "bee", "cloud", "daisy", "eel")


def write_photos(root: Path, per_class: int = 12, seed: int = 0) -> Path:
    """A person's folder in the ImageFolder layout: 5 classes of JPEG and PNG photos of mixed
    sizes, each class its own colour under noise (learnable), one grayscale and one RGBA image
    among them, and a non-image file."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        colour = np.array([label * 60 % 256, 255 - label * 50, (label * 97) % 256])
        for index in range(per_class):
            height, width = 40 + 7 * (index % 4), 48 + 5 * (index % 3)
            noise = rng.integers(-30, 31, (height, width, 3))
            pixels = np.clip(colour + noise, 0, 255).astype(np.uint8)
            suffix = ".jpg" if index % 2 else ".png"
            Image.fromarray(pixels).save(root / name / f"photo_{index}{suffix}")
    gray = np.full((50, 60), 128, dtype=np.uint8)
    Image.fromarray(gray).save(root / CLASSES[1] / "gray.png")
    rgba = np.dstack([np.full((44, 44, 3), (0, 255, 0), np.uint8), np.full((44, 44), 200, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(root / CLASSES[2] / "rgba.png")
    (root / CLASSES[0] / "notes.txt").write_text("taken in the garden\n")
    return root


def png_bomb(path: Path, side: int = 50_000) -> Path:
    """A tiny PNG whose header declares side x side RGB pixels (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    body = zlib.compress(b"\0" * (side * 3 + 1) * 4)  # a few rows: the rest is missing
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body)
                     + chunk(b"IEND", b""))
    return path
