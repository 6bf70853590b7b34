"""GPU self-check: is the CUDA path right, and how fast is the default recipe there?

usage: python -m bench.gpu_check [IMAGES_DIR] [--seeds N] [--steps N] [--recipes default airbench94]

Needs a CUDA GPU, torch, torchvision, PyYAML and tqdm (not dvc or dvclive), and the image
folder the pipeline wrote (default data/images). Each check prints ok or FAIL; the exit status
is 1 if any failed. In order:
  1. versions, device and the precision `amp: auto` picks
  2. the loader's batches identical on CPU and CUDA, 2 epochs
  3. no host sync inside a training step, over one epoch (torch.cuda.set_sync_debug_mode)
  4. resume from a checkpoint on CUDA
  5. torch.compile compiles once across the whitening-bias freeze
  6. step time per precision and memory layout (CUDA events; bench.precision)
  7. time to accuracy: N seeds of each recipe (`default` is params.yaml; others are presets) on
     the default split and on all 50,000 training images, test accuracy at each TTA level, time
     as airbench counts it (whitening + training + final TTA), wall time and peak GPU memory.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from bench.flops import recipe_params
from bench.precision import Config, measure, report
from stages.lib.clock import Stopwatch
from stages.lib.data import BatchLoader, decode_split, load_data, normalize, to_device
from stages.lib.devices import memory_budget, pick_device, pick_precision
from stages.lib.inference import TTA_WEIGHTS, loss_and_accuracy, predict_levels
from stages.lib.loop import Checkpoint, Env, Training, fit, train_one_epoch, training_loader
from stages.lib.nets import fresh_model
from stages.lib.optim import scratch_groups
from stages.lib.params import TrainParams, build, for_dataset

SUBSET = 4096  # images for the quick checks (2-5)
CLASSES = 10  # CIFAR-10's: the recipe being checked is CIFAR-10's


class Crash(Exception):
    """Raised after an epoch to stand for a crash."""


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of the time-to-accuracy table."""
    split: str
    seed: int
    accuracy: dict[str, float]  # test accuracy per TTA level
    train_seconds: float  # airbench's accounting: whitening + epochs + final TTA
    wall_seconds: float
    peak_gib: float


def summary(runs: list[Run]) -> list[str]:
    """Per recipe and split (each run was printed as it finished): every column's mean +- its
    sample standard deviation over the seeds."""
    lines = []
    for split in dict.fromkeys(r.split for r in runs):
        group = [dataclasses.asdict(r) for r in runs if r.split == split]
        columns = {f"test {level}": [g["accuracy"][level] for g in group] for level in TTA_WEIGHTS}
        columns |= {key: [g[key] for g in group] for key in ("train_seconds", "wall_seconds", "peak_gib")}
        cells = [f"{name} {statistics.mean(v):.4f}+-{statistics.stdev(v) if len(v) > 1 else 0:.4f}"
                 for name, v in columns.items()]
        lines.append(f"{split}, mean of {len(group)}: " + ", ".join(cells))
    return lines


def check(name: str, ok: bool, detail: str) -> bool:
    print(f"[{'ok' if ok else 'FAIL'}] {name}: {detail}", flush=True)
    return ok


def check_loader(params: TrainParams, images: torch.Tensor, labels: torch.Tensor,
                 device: torch.device) -> bool:
    """The same seed draws the same batches on the CPU and on the GPU, bit for bit."""
    host = training_loader(params, images, labels, seed=0)
    gpu = training_loader(params, images.to(device), labels.to(device), seed=0)
    batches = 0
    for _ in range(2):
        for (x_cpu, y_cpu), (x_gpu, y_gpu) in zip(host, gpu, strict=True):
            if not (torch.equal(x_cpu, x_gpu.cpu()) and torch.equal(y_cpu, y_gpu.cpu())):
                return check("loader", False, f"batch {batches} differs between CPU and CUDA")
            batches += 1
    return check("loader", True, f"{batches} batches of 2 epochs identical on CPU and CUDA")


class StrictLoader:
    """Batches under torch.cuda's sync debug mode 'error': any host sync between the first
    batch and the end of the epoch (the steps) raises. The epoch's draws are copied to the GPU
    before the first batch, and the epoch's totals read after the last: those are per epoch."""

    def __init__(self, loader: BatchLoader) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def indexed(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        batches = self.loader.indexed()
        first = next(batches)
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield first
            yield from batches
        finally:
            torch.cuda.set_sync_debug_mode("default")


def new_training(params: TrainParams, images: torch.Tensor, labels: torch.Tensor, seed: int,
                 watch: Stopwatch | None = None) -> Training:
    """The train stage's recipe from scratch on the images' device (watch: its clock), for the
    CIFAR-10 classes (checked in main)."""
    device = images.device
    watch = watch or Stopwatch(device)
    torch.manual_seed(seed)
    with watch.section():
        model = fresh_model(params.arch, CLASSES, images)
    loader = training_loader(params, images, labels, seed)
    env = Env(device, pick_precision(device, params.amp), watch=watch)
    return Training(model, scratch_groups(model, params), params, loader, env)


def check_syncs(params: TrainParams, images: torch.Tensor, labels: torch.Tensor) -> bool:
    training = new_training(params, images, labels, seed=0)
    training.loader = StrictLoader(training.loader)
    try:
        train_one_epoch(training)
    except RuntimeError as err:
        if "synchroniz" not in str(err):  # only the sync debug mode's own error is a verdict
            raise
        return check("host syncs", False, f"a step synchronised with the host: {str(err).splitlines()[0]}")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return check("host syncs", True, f"none inside {training.step} training steps of one epoch")


def check_resume(params: TrainParams, images: torch.Tensor, labels: torch.Tensor, work: Path) -> bool:
    """Crash after epoch 1, resume from the checkpoint on CUDA, finish; compare to a whole run."""
    params = dataclasses.replace(params, epochs=3.0)
    whole = new_training(params, images, labels, seed=0)
    fit(whole, None, Checkpoint(work / "whole.pt", "gpu_check"), lambda e, row: None)

    def crash(epoch: int, row: dict) -> None:
        if epoch == 0:
            raise Crash
    try:
        fit(new_training(params, images, labels, seed=0), None, Checkpoint(work / "run.pt", "gpu_check"), crash)
    except Crash:
        pass
    resumed = new_training(params, images, labels, seed=0)
    logged: list[int] = []
    fit(resumed, None, Checkpoint(work / "run.pt", "gpu_check"), lambda e, row: logged.append(e))
    same_draws = torch.equal(resumed.loader.generator.get_state(), whole.loader.generator.get_state())
    gap = max((a.float() - b.float()).abs().max().item()
              for a, b in zip(resumed.model.state_dict().values(), whole.model.state_dict().values()))
    ok = logged == [0, 1, 2] and resumed.step == whole.step and same_draws
    return check("resume", ok, f"epochs replayed {logged}, steps {resumed.step}/{whole.step}, loader "
                 f"draws {'identical' if same_draws else 'DIFFERENT'}; largest weight difference to an "
                 f"uninterrupted run {gap:.2e} (cuDNN's kernels need not be deterministic)")


def check_compile(params: TrainParams, images: torch.Tensor, labels: torch.Tensor, work: Path) -> bool:
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    epochs = params.whiten_bias_epochs + 1.0
    # at one image size: each size of progressive resizing is a graph of its own, by design
    training = new_training(dataclasses.replace(params, compile=True, epochs=epochs, progressive_from=0),
                            images, labels, 0)
    start = time.perf_counter()
    fit(training, None, Checkpoint(work / "compile.pt", "gpu_check"), lambda e, row: None)
    graphs = counters["stats"]["unique_graphs"]  # a recompile makes a second graph
    return check("compile", graphs == 1,
                 f"{graphs} graph(s) over {epochs:g} epochs across the whitening-bias freeze; "
                 f"{time.perf_counter() - start:.1f} s with compilation")


def time_run(params: TrainParams, split: str, train: tuple[torch.Tensor, torch.Tensor],
             val: tuple[torch.Tensor, torch.Tensor] | None, test: tuple[torch.Tensor, torch.Tensor],
             seed: int, work: Path) -> Run:
    """One run as the train stage makes it (validation every `eval_every` epochs and
    checkpoints included in the wall time), then the test split at every TTA level."""
    torch.cuda.reset_peak_memory_stats()
    watch = Stopwatch(train[0].device)
    training = new_training(params, *train, seed, watch)
    fit(training, val, Checkpoint(work / f"tta-{split}-{seed}.pt", "gpu_check"), lambda e, row: None)
    with watch.section():
        logits = predict_levels(training.model, test[0], params.eval_batch_size, list(TTA_WEIGHTS),
                                training.precision.dtype)
    accuracy = {level: loss_and_accuracy(x, test[1])[1] for level, x in logits.items()}
    return Run(split, seed, accuracy, watch.seconds(), watch.wall_seconds(),
               torch.cuda.max_memory_allocated() / 2 ** 30)


def recipe(name: str) -> TrainParams:
    """The current folder's recipe `name` (bench.flops.recipe_params): its train section, on CUDA."""
    train = recipe_params(name, {}, Path("."))["train"]
    return dataclasses.replace(for_dataset(build(TrainParams, train, "train"), "cifar10"), device="cuda")


def versions(device: torch.device, params: TrainParams) -> None:
    import torchvision
    props = torch.cuda.get_device_properties(device)
    precision = pick_precision(device, params.amp)
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, CUDA {torch.version.cuda}, "
          f"cuDNN {torch.backends.cudnn.version()}; {props.name}, {props.total_memory / 2 ** 30:.0f} GiB, "
          f"compute capability {props.major}.{props.minor}; precision {precision.name} ({precision.reason})",
          flush=True)


def require_cuda() -> None:
    if not torch.cuda.is_available():
        raise SystemExit(f"bench.gpu_check: needs a CUDA GPU; torch {torch.__version__} (CUDA "
                         f"{torch.version.cuda}) sees none. Run it on a GPU machine.")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check",
                                     description="GPU self-check of the CUDA path and the default recipe.")
    parser.add_argument("images_dir", nargs="?", type=Path, default=Path("data/images"))
    parser.add_argument("--packed", type=Path, default=Path("data/packed"),
                        help="the packed splits preprocess wrote beside the image folder")
    parser.add_argument("--seeds", type=int, default=5, help="seeds per split for time to accuracy")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per precision")
    parser.add_argument("--recipes", nargs="+", default=["default", "airbench94"],
                        help="default (params.yaml) or a presets/ name, for time to accuracy")
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.steps < 1:
        parser.error("--seeds and --steps must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    require_cuda()
    if not (args.images_dir / "train.csv").exists():
        raise SystemExit(f"bench.gpu_check: {args.images_dir}/train.csv not found; run `make repro` "
                         "(or copy data/images here) first")
    recipes = {name: recipe(name) for name in args.recipes}
    params = recipes.get("default", next(iter(recipes.values())))
    device = pick_device("cuda")
    versions(device, params)
    start = time.perf_counter()
    data = load_data(args.packed, device, memory_budget("auto", device))
    if len(data.classes) != CLASSES:
        raise SystemExit(f"bench.gpu_check: {args.images_dir} has {len(data.classes)} classes; it "
                         f"checks the CIFAR-10 recipe ({CLASSES})")
    test_images, test_labels = decode_split(args.images_dir / "test.csv", args.images_dir,
                                            CLASSES, workers=8)
    test = (normalize(to_device(test_images, device), **data.normalization), test_labels.to(device))
    print(f"decoded {len(data.train_labels) + len(test_labels)} images in {time.perf_counter() - start:.1f} s")
    subset = (data.train_images[:SUBSET], data.train_labels[:SUBSET])
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        results.append(check_loader(params, subset[0].cpu(), subset[1].cpu(), device))
        results.append(check_syncs(params, data.train_images, data.train_labels))
        results.append(check_resume(params, *subset, work))
        results.append(check_compile(params, *subset, work))
        precision = pick_precision(device, params.amp)
        medians = measure(params, device, params.batch_size, args.steps)
        chosen = Config(precision.name, "channels_last")
        print("\n".join(report(medians, chosen, precision, params.batch_size)), flush=True)
        # (train, val) as the stage would get them with the folder's split and with val_fraction 0
        splits = {"default (train split)": ((data.train_images, data.train_labels), data.val)}
        if data.val is not None:
            splits["all 50,000 (val 0)"] = ((torch.cat([data.train_images, data.val[0]]),
                                             torch.cat([data.train_labels, data.val[1]])), None)
        runs = []
        for name, params in recipes.items():
            for split, (train, val) in splits.items():
                for seed in range(args.seeds):
                    runs.append(time_run(params, f"{name}, {split}", train, val, test, seed, work))
                    print(json.dumps(dataclasses.asdict(runs[-1])), flush=True)
    print("\n".join(summary(runs)))
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
