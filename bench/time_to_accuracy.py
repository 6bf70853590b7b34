"""Benchmark: time to accuracy, airbench94's recipe (the baseline) beside the default.

usage: python -m bench.time_to_accuracy [IMAGES_DIR] [--seeds 0 1 2] [--recipes airbench94 default]
                                        [--set SECTION.KEY=VALUE ...]
       (IMAGES_DIR defaults to data/images, as `make repro` leaves it; --set changes the default
       recipe only, e.g. `--set train.ema_every=0` for an ablation)

Runs the real train stage (`python -m stages.train`: everything it does counts, from start-up
and decoding to the final validation) once per seed and recipe, seeds interleaved so that a
machine whose speed drifts slows both alike, each in a scratch directory and with one validation
pass at the end (`eval_every: 0`, whatever the recipe says); then scores its model
on the test split with the recipe's TTA. Prints each run, then per recipe the test accuracy's
mean and spread (sample standard deviation), the train stage's mean time, its ratio to the
baseline's, the recipe's training FLOPs and their ratio (bench.flops.recipe_flops: what the
time ratio would be if every FLOP ran as fast), and one training step's achieved GFLOP/s
against this machine's matmul peak.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from bench.flops import BASELINE, ROOT, matmul_peak, recipe_flops, recipe_params, step_throughput
from stages.lib.card import ModelCard, load_trained
from stages.lib.data import decode_split, normalize, read_annotations, read_classes
from stages.lib.devices import cpu_summary, pick_precision
from stages.lib.inference import TTA_WEIGHTS, loss_and_accuracy, predict_levels
from stages.lib.params import Params, build

GOAL_RATIO = 0.5


@dataclass
class Recipe:
    name: str
    params: dict  # a whole params.yaml, as a mapping
    accuracies: list[float] = field(default_factory=list)
    stage_seconds: list[float] = field(default_factory=list)
    training_seconds: list[float] = field(default_factory=list)


def stage_params(params: dict, seed: int) -> dict:
    """`params` for one timed run: `seed`, and one validation pass, after the last epoch, for
    every recipe. Per-epoch passes are monitoring, not recipe (airbench94's preset keeps the
    pre-#13 `eval_every: 1`), and would add about 2 s an epoch to one side of the ratio."""
    return {**params, "train": {**params["train"], "seed": seed, "eval_every": 0}}


def train_once(images_dir: Path, params: dict, seed: int, work: Path) -> float:
    """Run the train stage in `work` with `params` and `seed`; returns its wall time in seconds."""
    (work / "params.yaml").write_text(yaml.safe_dump(stage_params(params, seed)))
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


def run(recipe: Recipe, images_dir: Path, seed: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        seconds = train_once(images_dir, recipe.params, seed, Path(tmp))
        levels = test_accuracies(images_dir, Path(tmp) / "model")
        stage = json.loads((Path(tmp) / "metrics.json").read_text())
        tta = ModelCard.read(Path(tmp) / "model").params["tta"]  # as the stage resolved `auto`
    recipe.accuracies.append(levels[tta])
    recipe.stage_seconds.append(seconds)
    recipe.training_seconds.append(stage["train_seconds"])
    others = ", ".join(f"{level} {acc:.4f}" for level, acc in levels.items() if level != tta)
    print(f"{recipe.name} seed {seed}: test accuracy ({tta}) {levels[tta]:.4f} ({others}), train "
          f"stage {seconds:.0f} s (training {stage['train_seconds']:.0f} s)", flush=True)


def spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def table(recipes: list[Recipe], peak: float, examples: int) -> list[str]:
    base = next((r for r in recipes if r.name == BASELINE), recipes[0])
    base_s = statistics.mean(base.stage_seconds)
    flops = {r.name: recipe_flops(build(Params, r.params, "").train, examples) for r in recipes}
    lines = [f"{'recipe':<12} {'test accuracy':>17} {'train stage s':>14} {'training s':>11} "
             f"{'time ratio':>11} {'TFLOP':>7} {'FLOP ratio':>11} {'CPU step GFLOP/s':>17} {'of peak':>8}"]
    for recipe in recipes:
        train = recipe.params["train"]
        flops_per_s = step_throughput(train["arch"], train["batch_size"], train["amp"])
        stage_s = statistics.mean(recipe.stage_seconds)
        lines.append(f"{recipe.name:<12} {statistics.mean(recipe.accuracies):>8.4f} +- "
                     f"{spread(recipe.accuracies):.4f} {stage_s:>14.0f} "
                     f"{statistics.mean(recipe.training_seconds):>11.0f} {stage_s / base_s:>11.2f} "
                     f"{flops[recipe.name] / 1e12:>7.1f} {flops[recipe.name] / flops[base.name]:>11.2f} "
                     f"{flops_per_s / 1e9:>17.0f} {flops_per_s / peak:>8.2f}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images_dir", nargs="?", type=Path, default=Path("data/images"))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--recipes", nargs="+", default=[BASELINE, "default"])
    parser.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args()
    if not (args.images_dir / "train.csv").exists():
        raise SystemExit(f"bench: needs {args.images_dir}; run `make repro` first")
    changes = {k: yaml.safe_load(v) for k, v in (a.split("=", 1) for a in args.set)}
    recipes = [Recipe(name, recipe_params(name, changes)) for name in args.recipes]
    print(f"CPU {cpu_summary()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"seeds {args.seeds}; default changed by {changes or 'nothing'}", flush=True)
    for seed in args.seeds:
        for recipe in recipes:
            run(recipe, args.images_dir, seed)
    # on the CPU (bench.flops): on a GPU machine the train stage's own device differs
    precision = pick_precision(torch.device("cpu"), "auto")
    peak = matmul_peak(precision.dtype)
    print(f"CPU matmul peak ({precision.name}, measured): {peak / 1e9:.0f} GFLOP/s")
    classes = read_classes(args.images_dir)
    examples = len(read_annotations(args.images_dir / "train.csv", args.images_dir, len(classes)).labels)
    print("\n".join(table(recipes, peak, examples)))
    print(f"goal: the default's time ratio <= {GOAL_RATIO} at a mean test accuracy >= {BASELINE}'s")


if __name__ == "__main__":
    main()
