"""evaluate: trained models + the test split -> metrics/eval/<model>.json and plots

usage: python -m stages.evaluate PACKED_DIR METRICS_DIR PLOTS_DIR MODEL_DIR...

For each MODEL_DIR (named e.g. models/train), writes METRICS_DIR/<name>.json (accuracy, loss,
macro F1, flip and flip+shift test-time-augmented accuracy, where it ran) and
PLOTS_DIR/<name>/confusion.csv (a count for every actual, predicted pair), per_class.csv (per-class
accuracy) and misclassified.png (a grid of wrong test images, true -> predicted).
"""
from __future__ import annotations

from stages.lib.params import preflight

preflight(__name__, __doc__)  # --help, and bad params.yaml, answered before the slow imports

import csv
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from stages.lib.card import ModelCard, load_trained
from stages.lib.data import Images, Pack, PackedImages, read_classes
from stages.lib.devices import announce, hardware, pick_device, pick_precision
from stages.lib.folder import CLASSES_FILE
from stages.lib.inference import loss_and_accuracy, predict_levels
from stages.lib.outputs import StageError, atomic_dir, stage_main, write_json
from stages.lib.params import EvaluateParams, load_params

CELL_SIDE = 96  # pixels a small test image is enlarged to in the grid
LABEL_HEIGHT = 14
GRID_COLUMNS = 8


def confusion_matrix(labels: torch.Tensor, predictions: torch.Tensor, num_classes: int) -> torch.Tensor:
    """counts[true, predicted]."""
    flat = labels * num_classes + predictions
    return torch.bincount(flat, minlength=num_classes ** 2).view(num_classes, num_classes)


def macro_f1(confusion: torch.Tensor) -> float:
    """Mean over classes of 2 TP / (2 TP + FP + FN); a class never seen nor predicted scores 0."""
    confusion = confusion.double()
    tp = confusion.diag()
    denominator = confusion.sum(0) + confusion.sum(1)
    return (2 * tp / denominator.clamp_min(1)).mean().item()


def score(model: torch.nn.Module, card: ModelCard, images: Images, labels: torch.Tensor,
          batch_size: int, dtype: torch.dtype | None) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Metrics for one model, test-time-augmented at the levels that suit its data; returns
    (metrics, confusion counts, predictions without TTA).
    Per-class figures go to per_class.csv and its plot, not into the metrics: a column each
    would crowd `dvc exp show`."""
    levels, classes = card.tta_levels, card.classes
    logits = predict_levels(model, images, batch_size, levels, dtype)
    loss, accuracy = loss_and_accuracy(logits["none"], labels)
    metrics: dict[str, float] = {"accuracy": round(accuracy, 5), "loss": round(loss, 5)}
    for tta in levels[1:]:
        metrics[f"accuracy_tta_{tta}"] = round(loss_and_accuracy(logits[tta], labels)[1], 5)
    predictions = logits["none"].argmax(1)
    confusion = confusion_matrix(labels.cpu(), predictions.cpu(), len(classes))
    metrics["macro_f1"] = round(macro_f1(confusion), 5)
    return metrics, confusion, predictions


def write_confusion(path: Path, confusion: torch.Tensor, classes: list[str]) -> None:
    """Every (actual, predicted) pair with its count, zeros included, in class order: the
    project's `confusion_counts` plot template then puts every class on both axes."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["actual", "predicted", "count"])
        for actual, row in zip(classes, confusion.tolist()):
            writer.writerows([actual, predicted, count] for predicted, count in zip(classes, row))


def write_per_class(path: Path, confusion: torch.Tensor, classes: list[str]) -> None:
    """Each class's test accuracy (its recall); a class without test images scores 0."""
    per_class = confusion.diag().double() / confusion.sum(1).clamp_min(1)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class", "accuracy"])
        writer.writerows(zip(classes, [round(value, 5) for value in per_class.tolist()]))


def misclassified_grid(pack: Pack, labels: torch.Tensor, predictions: torch.Tensor,
                       classes: list[str], count: int) -> Image.Image:
    """A grid of the first `count` wrong test images, each captioned `true>predicted`; small
    images are drawn enlarged (32 px at 96), so that they are recognisable."""
    wrong = torch.nonzero(labels != predictions).flatten()[:count].tolist()
    images = pack.read(np.array(wrong, dtype=np.int64)).transpose(0, 2, 3, 1)  # N, H, W, C
    height, width = pack.shape[-2:]
    scale = max(1, CELL_SIDE // max(height, width))
    cell_w, cell_h = width * scale, height * scale
    rows = max(1, -(-len(wrong) // GRID_COLUMNS))
    grid = Image.new("RGB", (GRID_COLUMNS * cell_w, rows * (cell_h + LABEL_HEIGHT)), "white")
    draw = ImageDraw.Draw(grid)
    for slot, (index, pixels) in enumerate(zip(wrong, images)):
        x, y = (slot % GRID_COLUMNS) * cell_w, (slot // GRID_COLUMNS) * (cell_h + LABEL_HEIGHT)
        image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
        grid.paste(image.resize((cell_w, cell_h), Image.NEAREST), (x, y))
        caption = f"{classes[labels[index]]}>{classes[predictions[index]]}"
        draw.text((x + 2, y + cell_h + 1), caption[:16], fill="black")
    return grid


MACHINE_FILE = "machine.json"  # the device, CPU and precision evaluate scored on


def evaluate(images_dir: Path, metrics_dir: Path, plots_dir: Path, model_dirs: list[Path],
             params: EvaluateParams) -> None:
    device = pick_device(params.device)
    precision = pick_precision(device, params.amp)
    announce(device, precision)
    machine = hardware(device, precision)
    classes = read_classes(images_dir)
    pack = Pack(images_dir, "test", len(classes))  # streamed a batch at a time: any size fits
    labels = pack.labels
    device_labels = labels.to(device)
    results: dict[str, dict] = {}
    with atomic_dir(plots_dir) as plots_tmp:
        for model_dir in model_dirs:
            model, card = load_trained(model_dir)
            if card.classes != classes:
                raise StageError(f"{model_dir}/model.json: classes {card.classes} differ from "
                                 f"{images_dir / CLASSES_FILE} {classes}")
            if card.shape != tuple(pack.shape[1:]):
                raise StageError(f"{model_dir}/model.json: the model takes {card.shape} (channels, "
                                 f"height, width) images, {pack.path} holds {tuple(pack.shape[1:])}; "
                                 "retrain it on this image folder (`dvc repro`)")
            images = PackedImages(pack, card.normalization, device)
            model = model.to(device, memory_format=torch.channels_last)
            started = time.perf_counter()
            metrics, confusion, predictions = score(model, card, images, device_labels,
                                                    params.batch_size, precision.dtype)
            seconds = time.perf_counter() - started
            out = plots_tmp / model_dir.name
            out.mkdir()
            write_confusion(out / "confusion.csv", confusion, classes)
            write_per_class(out / "per_class.csv", confusion, classes)
            misclassified_grid(pack, labels, predictions.cpu(), classes,
                               params.misclassified).save(out / "misclassified.png")
            print(f"evaluate {model_dir}: " + ", ".join(f"{k} {v}" for k, v in list(metrics.items())[:6])
                  + f" (scored in {seconds:.1f} s)")
            results[model_dir.name] = metrics
        # where it was scored, beside the plots: the metrics files hold only what compares
        write_json(plots_tmp / MACHINE_FILE, machine)
    for name, metrics in results.items():
        write_json(metrics_dir / f"{name}.json", metrics)


@stage_main
def main() -> None:
    if len(sys.argv) < 5:
        raise SystemExit(__doc__)
    images_dir, metrics_dir, plots_dir, *model_dirs = map(Path, sys.argv[1:])
    evaluate(images_dir, metrics_dir, plots_dir, model_dirs, load_params().evaluate)


if __name__ == "__main__":
    main()
