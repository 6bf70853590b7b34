"""A training run as train and finetune both do it: data on the device, the loop, DVCLive
curves, and the saved model (state_dict + JSON sidecar) and metrics."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from dvclive import Live
from torch import nn

from stages.data import BatchLoader, decode_split, normalize, read_classes, read_normalization
from stages.devices import Ranks, start, stop
from stages.loop import (Checkpoint, Group, Training, fit, loss_and_accuracy, predict_levels,
                         to_device)
from stages.model import save_model
from stages.outputs import write_json
from stages.params import TrainParams


@dataclass(frozen=True)
class Data:
    """The splits a training stage needs, decoded once and normalized on the device."""
    classes: list[str]
    normalization: dict[str, list[float]]
    train_images: torch.Tensor
    train_labels: torch.Tensor
    val: tuple[torch.Tensor, torch.Tensor] | None
    fingerprint: str  # of the CSVs: a checkpoint from other data is not resumed


def load_split(root: Path, split: str, classes: list[str], stats: dict[str, list[float]],
               device: torch.device, workers: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = decode_split(root / f"{split}.csv", root, len(classes), workers)
    return normalize(to_device(images, device), stats["mean"], stats["std"]), labels.to(device)


def load_data(root: Path, device: torch.device, workers: int) -> Data:
    classes = read_classes(root)
    stats = read_normalization(root)
    train_images, train_labels = load_split(root, "train", classes, stats, device, workers)
    has_val = (root / "val.csv").exists()
    val = load_split(root, "val", classes, stats, device, workers) if has_val else None
    digest = hashlib.sha256()
    for name in ("train.csv", "val.csv", "normalization.json"):
        if (root / name).exists():
            digest.update((root / name).read_bytes())
    return Data(classes, stats, train_images, train_labels, val, digest.hexdigest())


def fingerprint(*parts: object) -> str:
    """A stable hash of params and data identity, to tell a checkpoint of this run."""
    text = json.dumps([dataclasses.asdict(p) if dataclasses.is_dataclass(p) else p for p in parts],
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def run_stage(name: str, usage: str, params: TrainParams,
              body: Callable[[Path, "Outputs", Ranks, torch.device, float], dict]) -> None:
    """The main of train and finetune: paths from argv, torchrun's ranks (if any), the body,
    one summary line from rank 0."""
    if len(sys.argv) != 6:
        raise SystemExit(usage)
    started = time.perf_counter()
    images_dir, *paths = map(Path, sys.argv[1:])
    ranks, device = start(params.device, params.batch_size)
    try:
        metrics = body(images_dir, Outputs(*paths), ranks, device, started)
    finally:
        stop()
    if ranks.main:
        print(f"{name}: " + ", ".join(f"{k} {v}" for k, v in metrics.items()))


@dataclass(frozen=True)
class Outputs:
    """Where a training stage writes, as dvc.yaml gives them on its command line."""
    model_dir: Path
    metrics: Path
    live_dir: Path
    checkpoint: Path


def train_and_save(model: nn.Module, groups: list[Group], params: TrainParams, data: Data,
                   seed: int, device: torch.device, ranks: Ranks, outputs: Outputs,
                   started: float, recorded: dict, report: dict) -> dict:
    """Run the loop, then write model.pt, model.json and the metrics file; returns the metrics.

    `recorded` holds the stage's own params beyond `params` (saved in model.json, and part of
    the checkpoint fingerprint); `report` is added to the metrics file as it is. Under
    torchrun only rank 0 logs and writes; the other ranks return empty metrics.
    """
    loader = BatchLoader(data.train_images, data.train_labels, params.batch_size,
                         crop_padding=params.crop_padding, flip=params.flip, shuffle=True,
                         drop_last=len(data.train_labels) >= params.batch_size, seed=seed,
                         shard=(ranks.rank, ranks.world))
    training = Training(model, groups, params, loader, device, ranks)
    checkpoint = Checkpoint(outputs.checkpoint,
                            fingerprint(params, seed, data.fingerprint, recorded, ranks.world))
    if not ranks.main:
        fit(training, None, checkpoint, lambda epoch, row: None)
        return {}
    with Live(str(outputs.live_dir), dvcyaml=None, save_dvc_exp=False, report=None) as live:
        def log_epoch(epoch: int, row: dict[str, float]) -> None:
            live.step = epoch
            for key, value in row.items():
                live.log_metric(key, value)
            live.make_summary()

        train_seconds = fit(training, data.val, checkpoint, log_epoch)
    metrics = final_metrics(training, data, params, train_seconds)
    metrics["wall_seconds"] = round(time.perf_counter() - started, 2)
    save_model(model, outputs.model_dir, {
        "arch": params.arch, "classes": data.classes, "normalization": data.normalization,
        "input_size": list(data.train_images.shape[-2:]),
        "params": {"seed": seed, **dataclasses.asdict(params), **recorded}, "metrics": metrics})
    write_json(outputs.metrics, {**metrics, **report})
    return metrics


def final_metrics(training: Training, data: Data, params: TrainParams, train_seconds: float) -> dict:
    images_seen = training.step * params.batch_size
    metrics: dict = {"epochs": params.epochs, "steps": training.step,
                     "train_seconds": round(train_seconds, 2),
                     "images_per_second": round(images_seen / max(train_seconds, 1e-9), 1)}
    if data.val is not None:
        levels = list(dict.fromkeys(("none", params.tta)))
        logits = predict_levels(training.model, data.val[0], params.eval_batch_size, levels, params.amp)
        for tta in levels:
            loss, accuracy = loss_and_accuracy(logits[tta], data.val[1])
            suffix = "" if tta == "none" else f"_tta_{tta}"
            metrics[f"val_loss{suffix}"] = round(loss, 5)
            metrics[f"val_accuracy{suffix}"] = round(accuracy, 5)
    return metrics
