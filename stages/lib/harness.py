"""The harness of a training stage, as train and finetune both use it: its command-line paths, its
environment (ranks, device, precision, clock), the checkpoint's fingerprint, DVCLive's
per-epoch log, the final metrics, and the saved model and metrics file."""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from dvclive import Live
from torch import nn

from stages.lib.card import ModelCard, save_model
from stages.lib.clock import Stopwatch
from stages.lib.data import Data
from stages.lib.devices import announce, hardware, pick_precision
from stages.lib.inference import loss_and_accuracy
from stages.lib.loop import Env, Training, final_levels, final_validation
from stages.lib.outputs import write_json
from stages.lib.params import TrainParams
from stages.lib.ranks import start, stop

# What a checkpoint holds; a new one when that changes, so that an older file starts afresh
# instead of failing to load (2: the per-epoch histograms and lr in the history)
CHECKPOINT_FORMAT = 2


def fingerprint(params: TrainParams, data: Data, env: Env, recorded: dict | None = None) -> str:
    """A stable hash of the run's params (with the stage's own, `recorded`), data identity,
    ranks, device and precision, to tell a checkpoint of this run."""
    parts = [dataclasses.asdict(params), data.fingerprint, recorded or {}, env.ranks.world,
             env.device.type, env.precision.name, CHECKPOINT_FORMAT]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class Outputs:
    """Where a training stage writes, as dvc.yaml gives them on its command line."""
    model_dir: Path
    metrics: Path
    live_dir: Path
    checkpoint: Path


def stage_paths(usage: str) -> tuple[Path, Outputs]:
    """PACKED_DIR MODEL_DIR METRICS_JSON LIVE_DIR CHECKPOINT from the command line."""
    if len(sys.argv) != 6:
        raise SystemExit(usage)
    images_dir, *paths = map(Path, sys.argv[1:])
    return images_dir, Outputs(*paths)


@contextlib.contextmanager
def training_env(params: TrainParams) -> Iterator[Env]:
    """Start the ranks and pick device and precision (announced by rank 0); stop on exit."""
    ranks, device = start(params.device, params.batch_size)
    env = Env(device, pick_precision(device, params.amp), ranks, Stopwatch(device))
    if ranks.main:
        announce(device, env.precision)
    done = False
    try:
        yield env
        done = True
    finally:
        stop(done)


def print_summary(name: str, metrics: dict) -> None:
    print(f"{name}: " + ", ".join(f"{k} {v}" for k, v in metrics.items()))


@contextlib.contextmanager
def epoch_logger(live_dir: Path, training: Training) -> Iterator[Callable[[int, dict], None]]:
    """fit's per-epoch log: each row, and the weight and gradient histograms, to DVCLive in
    `live_dir` (rank 0 alone; the other ranks log nothing)."""
    if not training.ranks.main:
        yield lambda epoch, row: None
        return
    with Live(str(live_dir), dvcyaml=None, save_dvc_exp=False, report=None) as live:

        def log_epoch(epoch: int, row: dict[str, float]) -> None:
            # DVCLive's step counts epochs from 1, the x axis of the `epochs` plots (a fractional
            # last epoch is step ceil(epochs)); replayed epochs of a resumed run come first
            live.step = epoch + 1
            for key, value in row.items():
                live.log_metric(key, value)
            if epoch == len(training.histograms):  # a new epoch: the model is its own
                training.histograms.append(layer_histograms(training.model, epoch + 1))
            if epoch == training.epoch - 1:  # the latest epoch: its plots hold every epoch's
                for kind in ("weights", "gradients"):
                    points = [p for drawn in training.histograms for p in drawn[kind]]
                    live.log_plot(kind, points, x="value", y="count", template="histograms")
            live.next_step()  # writes the summary; DVC's tools see each epoch as it ends

        yield log_epoch


def save_trained(training: Training, data: Data, outputs: Outputs, metrics: dict,
                 recorded: dict | None = None, report: dict | None = None) -> None:
    """model.pt and model.json (the params, the stage's own `recorded` among them, the metrics
    but their timings, and the machine), then the metrics file (the numbers that compare,
    with `report`); the checkpoint goes, so that a rerun (`dvc repro -f`) trains afresh."""
    params = training.params
    machine = hardware(training.device, training.precision)
    # no timings in model.json: the same weights make the same folder, and nothing downstream
    # of it goes stale (they are in the metrics file)
    save_model(training.model, outputs.model_dir, ModelCard(
        arch=params.arch, classes=data.classes, normalization=data.normalization,
        input_size=list(data.train_images.shape[-2:]),
        params={**dataclasses.asdict(params), **(recorded or {})},
        metrics={k: v for k, v in metrics.items() if k not in TIMINGS}, hardware=machine))
    write_json(outputs.metrics, {**metrics, **(report or {})})
    outputs.checkpoint.unlink(missing_ok=True)


TIMINGS = ("train_seconds", "images_per_second", "wall_seconds")
HISTOGRAM_BINS = 30


def layer_histograms(model: nn.Module, epoch: int) -> dict[str, list[dict]]:
    """Histograms of every conv and linear weight (the layers that matter: not biases or
    norms) and of its last step's gradient, as DVCLive custom-plot rows. A few histc calls an
    epoch: too cheap to be worth a switch (see docs/performance.md)."""
    rows: dict[str, list[dict]] = {"weights": [], "gradients": []}
    for name, param in model.named_parameters():
        if param.ndim < 2:
            continue
        for kind, tensor in (("weights", param), ("gradients", param.grad)):
            if tensor is None:  # frozen (airbench's whitening) or not yet stepped
                continue
            values = tensor.detach().float().flatten().cpu()
            low, high = values.min().item(), values.max().item()
            width = max(high - low, 1e-12) / HISTOGRAM_BINS
            counts = torch.histc(values, bins=HISTOGRAM_BINS, min=low, max=low + width * HISTOGRAM_BINS)
            rows[kind] += [{"layer": name, "epoch": epoch, "value": round(low + (i + 0.5) * width, 8),
                            "count": int(count)} for i, count in enumerate(counts.tolist())]
    return rows


def final_metrics(training: Training, data: Data) -> dict:
    """Validation at every level up to `tta` (timed: airbench counts its final evaluation),
    then the times: `train_seconds` counts the timed sections, `images_per_second` the epochs,
    `wall_seconds` the whole stage."""
    params = training.params
    metrics: dict = {"epochs": params.epochs, "steps": training.step}
    if data.val is not None:
        logits = final_validation(training, data.val[0])  # computed already, but on a resume
        for tta in final_levels(params):
            loss, accuracy = loss_and_accuracy(logits[tta], data.val[1])
            suffix = "" if tta == "none" else f"_tta_{tta}"
            metrics[f"val_loss{suffix}"] = round(loss, 5)
            metrics[f"val_accuracy{suffix}"] = round(accuracy, 5)
    metrics["train_seconds"] = round(training.watch.seconds(), 2)
    images_seen = training.step * params.batch_size
    metrics["images_per_second"] = round(images_seen / max(training.epochs_seconds, 1e-9), 1)
    metrics["wall_seconds"] = round(training.watch.wall_seconds(), 2)
    return metrics
