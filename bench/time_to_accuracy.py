"""Benchmark 4: test accuracy and train-stage wall time with the default params, per seed.

usage: python -m bench.time_to_accuracy [IMAGES_DIR] [SEEDS...] [SECTION.KEY=VALUE...]
       (default: data/images 0 1 2; e.g. `train.ema_every=0` runs an ablation)

Runs the real train stage (`python -m stages.train`, everything it does counts) once per seed
in a scratch directory, then scores its model on the test split with the stage's TTA.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from stages.data import decode_split, normalize, read_classes
from stages.devices import pick_precision
from stages.loop import TTA_WEIGHTS, loss_and_accuracy, predict_levels
from stages.model import load_trained
from stages.params import load_params

ROOT = Path(__file__).resolve().parents[1]


def train_once(images_dir: Path, seed: int, overrides: dict[str, object], work: Path) -> float:
    """Run the train stage with `seed` and `overrides`; returns its wall time in seconds."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"]["seed"] = seed
    for key, value in overrides.items():
        section, name = key.split(".")
        params[section][name] = value
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "stages.train", str(images_dir.resolve()), "model",
                    "metrics.json", "live", "checkpoint.pt"], cwd=work, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def test_accuracies(images_dir: Path, model_dir: Path) -> dict[str, float]:
    """Test accuracy at every TTA level, from one shared pass."""
    model, card = load_trained(model_dir)
    images, labels = decode_split(images_dir / "test.csv", images_dir, len(read_classes(images_dir)))
    images = normalize(images, card.normalization["mean"], card.normalization["std"])
    cpu = torch.device("cpu")
    levels = predict_levels(model, images, 1000, list(TTA_WEIGHTS), pick_precision(cpu, "auto").dtype)
    return {level: loss_and_accuracy(logits, labels)[1] for level, logits in levels.items()}


def main() -> None:
    images_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("data/images")
    args = sys.argv[2:]
    seeds = [int(a) for a in args if "=" not in a] or [0, 1, 2]
    overrides = {k: yaml.safe_load(v) for k, v in (a.split("=", 1) for a in args if "=" in a)}
    tta = overrides.get("train.tta", load_params(ROOT / "params.yaml").train.tta)
    if overrides:
        print(f"overrides: {overrides}")
    accuracies, seconds = [], []
    for seed in seeds:
        with tempfile.TemporaryDirectory() as tmp:
            seconds.append(train_once(images_dir, seed, overrides, Path(tmp)))
            levels = test_accuracies(images_dir, Path(tmp) / "model")
            accuracies.append(levels[tta])
            stage = json.loads((Path(tmp) / "metrics.json").read_text())
        others = ", ".join(f"{level} {acc:.4f}" for level, acc in levels.items() if level != tta)
        print(f"seed {seed}: test accuracy ({tta}) {accuracies[-1]:.4f} ({others}), train stage "
              f"{seconds[-1]:.0f} s (training {stage['train_seconds']:.0f} s)", flush=True)
    spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
    print(f"4. time to accuracy over seeds {seeds}: test accuracy {statistics.mean(accuracies):.4f} "
          f"+- {spread:.4f}, train stage {statistics.mean(seconds):.0f} s "
          f"(min {min(seconds):.0f}, max {max(seconds):.0f}); goal >= 0.91 within 450 s")


if __name__ == "__main__":
    main()
