"""Inference, as evaluate, predict and the training stages' validation run it: logits at every
test-time augmentation level in one pass over the views, and loss and accuracy from them."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from stages.lib.params import TTA_LEVELS


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to `dtype` (devices.pick_precision chose it); None computes in float32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# Test-time augmentation (airbench's levels): per level, the weights of the views that
# `tta_views` makes, in its order. Each level's views are a prefix of the next, so all levels
# share one pass.
TTA_WEIGHTS = dict(zip(TTA_LEVELS, [
    (1.0,),  # none
    (0.5, 0.5),  # flip
    (0.25, 0.25, 0.125, 0.125, 0.125, 0.125),  # flip_shift: and four 2-pixel shifts
], strict=True))


def tta_views(images: torch.Tensor, count: int) -> list[torch.Tensor]:
    """The first `count` of: the images, their mirror, a 1-pixel shift up-left and its mirror,
    a 1-pixel shift down-right and its mirror."""
    views = [images, images.flip(-1)]
    if count > 2:
        h, w = images.shape[-2:]
        padded = F.pad(images, (1, 1, 1, 1), mode="reflect")
        for shifted in (padded[..., :h, :w], padded[..., 2:, 2:]):
            views += [shifted, shifted.flip(-1)]
    return views[:count]


@torch.no_grad()
def predict_levels(model: nn.Module, images: torch.Tensor, batch_size: int, levels: list[str],
                   dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Float32 logits per TTA level for normalized images on the model's device; each view is
    computed once and shared by every level that uses it."""
    model.eval()
    count = max(len(TTA_WEIGHTS[level]) for level in levels)
    out: dict[str, list[torch.Tensor]] = {level: [] for level in levels}
    for batch in tqdm(images.split(batch_size), desc="predict", leave=False, mininterval=2):
        with autocast(batch.device, dtype):
            logits = [model(v.contiguous(memory_format=torch.channels_last)).float()
                      for v in tta_views(batch, count)]
        for level in levels:
            out[level].append(sum(w * x for w, x in zip(TTA_WEIGHTS[level], logits)))
    return {level: torch.cat(chunks) for level, chunks in out.items()}


def predict_logits(model: nn.Module, images: torch.Tensor, batch_size: int, tta: str,
                   dtype: torch.dtype | None) -> torch.Tensor:
    """Float32 logits for normalized images (on the model's device), averaged over `tta`."""
    return predict_levels(model, images, batch_size, [tta], dtype)[tta]


def loss_and_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    loss = F.cross_entropy(logits, labels).item()
    accuracy = (logits.argmax(1) == labels).float().mean().item()
    return loss, accuracy
