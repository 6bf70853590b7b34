"""predict: a trained model's top-k classes for any image files.

usage: python -m stages.predict MODEL_DIR IMAGE... [--top-k K] [--device D] [--amp A]

MODEL_DIR holds model.pt and model.json (e.g. models/finetune; its model.pt names it too);
model.json gives the class names, the input size and channels (images are resized and
converted to them: grayscale for a 1-channel model) and the normalization. Device and precision
follow the stages' rule (auto: CUDA, else MPS, else CPU; bf16 only where it is native).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from stages.lib.card import load_trained, model_dir_of
from stages.lib.data import image_array, load_image, normalize
from stages.lib.devices import announce, pick_device, pick_precision
from stages.lib.inference import predict_logits
from stages.lib.outputs import StageError, stage_main

PREDICT_BATCH = 256  # images per forward pass


def prepare(paths: list[Path], shape: tuple[int, int, int]) -> torch.Tensor:
    """uint8 N x C x H x W from image files of any size and mode, converted to `shape`'s
    channels and resized (bilinear) to its height and width."""
    channels, height, width = shape
    arrays = [image_array(load_image(p, channels).resize((width, height), resample=2))
              for p in paths]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def top_k(model_dir: Path, paths: list[Path], k: int, device: torch.device = torch.device("cpu"),
          dtype: torch.dtype | None = None) -> list[list[tuple[str, float]]]:
    model, card = load_trained(model_dir)
    classes, stats = card.classes, card.normalization
    images = normalize(prepare(paths, card.shape).to(device), stats["mean"], stats["std"])
    logits = predict_logits(model.to(device, memory_format=torch.channels_last), images,
                            PREDICT_BATCH, "none", dtype)
    probabilities = logits.softmax(1).cpu()
    values, indices = probabilities.topk(min(k, len(classes)), dim=1)
    return [[(classes[i], v) for i, v in zip(row_i.tolist(), row_v.tolist())]
            for row_i, row_v in zip(indices, values)]


@stage_main
def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.predict",
                                     description="Top-k classes of image files.")
    parser.add_argument("model_dir", type=model_dir_of, help="the model's folder or its model.pt")
    parser.add_argument("images", type=Path, nargs="+")
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto")
    parser.add_argument("--amp", choices=["auto", "true", "false"], default="auto",
                        help="auto: bf16 only where the device computes it natively")
    args = parser.parse_args()
    if args.top_k < 1:
        raise StageError(f"--top-k must be >= 1, found {args.top_k}")
    device = pick_device(args.device)
    precision = pick_precision(device, {"true": True, "false": False}.get(args.amp, "auto"))
    announce(device, precision)
    results = top_k(args.model_dir, args.images, args.top_k, device, precision.dtype)
    for path, predictions in zip(args.images, results):
        print(f"{path}: " + ", ".join(f"{name} {p:.3f}" for name, p in predictions))


if __name__ == "__main__":
    main()
