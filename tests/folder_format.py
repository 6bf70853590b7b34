"""Writes a CSV-annotated image folder directly, as a user's own data would be: any channel
count, size and number of classes, laid out as stages/folder.py says."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image

from stages.folder import CLASSES_FILE, CSV_HEADER, NORMALIZATION_FILE


def write_folder(root: Path, channels: int, size: int, num_classes: int,
                 per_class: dict[str, int], seed: int = 0) -> Path:
    """`per_class` images of each class per split; each class its own brightness per channel
    under noise, so that a model can learn it."""
    rng = np.random.default_rng(seed)
    classes = [f"class_{i:02d}" for i in range(num_classes)]
    train_pixels = []
    for split, count in per_class.items():
        rows = []
        for label, name in enumerate(classes):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for index in range(count):
                level = (np.arange(channels) * 37 + label * 255 // num_classes) % 256
                pixels = np.clip(level[None, None, :] + rng.integers(-40, 41, (size, size, channels)), 0, 255)
                pixels = pixels.astype(np.uint8)
                if split == "train":
                    train_pixels.append(pixels)
                path = f"{split}/{name}/{index}.png"
                Image.fromarray(pixels[..., 0] if channels == 1 else pixels).save(root / path)
                rows.append([path, label, name])
        with open(root / f"{split}.csv", "w", newline="") as f:
            csv.writer(f).writerows([CSV_HEADER, *rows])
    stack = np.stack(train_pixels).astype(np.float64) / 255
    (root / CLASSES_FILE).write_text(json.dumps(classes))
    (root / NORMALIZATION_FILE).write_text(json.dumps(
        {"mean": stack.mean(axis=(0, 1, 2)).tolist(), "std": stack.std(axis=(0, 1, 2)).tolist()}))
    return root
