"""predict: a trained model's top-k classes for any image files.

usage: python -m stages.predict MODEL_DIR IMAGE... [--top-k K]

MODEL_DIR holds model.pt and model.json (e.g. models/finetune); the sidecar gives the class
names, the input size (images are resized to it) and the normalization.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from stages.data import load_image, normalize
from stages.model import load_trained
from stages.outputs import StageError, stage_main


def prepare(paths: list[Path], size: tuple[int, int]) -> torch.Tensor:
    """uint8 N x 3 x H x W from image files of any size, resized (bilinear) to `size`."""
    arrays = [np.asarray(load_image(p).resize(size, resample=2), dtype=np.uint8) for p in paths]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def top_k(model_dir: Path, paths: list[Path], k: int) -> list[list[tuple[str, float]]]:
    model, sidecar = load_trained(model_dir)
    classes, stats = sidecar["classes"], sidecar["normalization"]
    height, width = sidecar.get("input_size", [32, 32])
    images = normalize(prepare(paths, (width, height)), stats["mean"], stats["std"])
    with torch.no_grad():
        probabilities = model(images).float().softmax(1)
    values, indices = probabilities.topk(min(k, len(classes)), dim=1)
    return [[(classes[i], v) for i, v in zip(row_i.tolist(), row_v.tolist())]
            for row_i, row_v in zip(indices, values)]


@stage_main
def main() -> None:
    parser = argparse.ArgumentParser(description="Top-k classes of image files.")
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("images", type=Path, nargs="+")
    parser.add_argument("--top-k", type=int, default=3)
    args = parser.parse_args()
    if args.top_k < 1:
        raise StageError(f"--top-k must be >= 1, found {args.top_k}")
    for path, predictions in zip(args.images, top_k(args.model_dir, args.images, args.top_k)):
        print(f"{path}: " + ", ".join(f"{name} {p:.3f}" for name, p in predictions))


if __name__ == "__main__":
    main()
