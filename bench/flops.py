"""FLOPs and FLOP/s: what a training step achieves against what the machine's matmul can.

The step's FLOPs are counted by torch's FlopCounterMode (convolutions and matmuls, forward and
backward: the work that matters) and divided by its median time on the CPU; the peak is a
large square matmul in the same precision, timed in the same process. A recipe's FLOPs add up
its steps, each at its epoch's image size and with its epoch's frozen blocks. A library of
bench.time_to_accuracy, which prints both beside its timings.
"""
from __future__ import annotations

import functools
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from stages.lib.data import BatchLoader, Sampling
from stages.lib.devices import keep_freed_memory, pick_precision
from stages.lib.inference import autocast
from stages.lib.loop import Env, Training, begin_epoch
from stages.lib.nets import build_model
from stages.lib.optim import scratch_groups
from stages.lib.params import Amp, Params, TrainParams, build, read_yaml, with_preset

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[1]
BASELINE = "airbench94"  # presets/airbench94.yaml: the default until #13
PEAK_SIDE = 4096  # large enough that the matmul runs at its best on every CPU kind measured
REPEATS = 3
COUNT_BATCH = 8  # images a step is counted on: FLOPs grow linearly with the batch
CIFAR_TRAIN = 45_000  # CIFAR-10's training images under the default split (val_fraction 0.1)


def median_seconds(fn, repeats: int = REPEATS) -> float:
    fn()  # warm-up: allocator growth, oneDNN's kernel choice
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak(dtype: torch.dtype | None) -> float:
    """FLOP/s of a PEAK_SIDE-square matmul in `dtype` (None: float32)."""
    a = torch.randn(PEAK_SIDE, PEAK_SIDE, dtype=dtype or torch.float32)
    b = torch.randn(PEAK_SIDE, PEAK_SIDE, dtype=dtype or torch.float32)
    return 2 * PEAK_SIDE ** 3 / median_seconds(lambda: a @ b)


def step_flops(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
               dtype: torch.dtype | None) -> int:
    """FLOPs of one forward and backward pass."""
    with FlopCounterMode(display=False) as counter:
        training_step(model, images, labels, dtype)
    return counter.get_total_flops()


def training_step(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                  dtype: torch.dtype | None) -> None:
    with autocast(CPU, dtype):
        loss = torch.nn.functional.cross_entropy(model(images).float(), labels)
    model.zero_grad(set_to_none=True)
    loss.backward()


@functools.cache  # recipes sharing network, batch and precision share the one measurement
def step_throughput(arch: str, batch_size: int, amp: Amp, size: int = 32) -> float:
    """Achieved FLOP/s of `arch`'s forward and backward pass on a CIFAR-shaped batch, in the
    precision `amp` picks on the CPU, with malloc set as the stages set it on the CPU."""
    keep_freed_memory()
    dtype = pick_precision(CPU, amp).dtype
    torch.manual_seed(0)
    model = build_model(arch, 10, (3, size, size)).to(memory_format=torch.channels_last).train()
    images = torch.randn(batch_size, 3, size, size).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (batch_size,))
    flops = step_flops(model, images, labels, dtype)
    return flops / median_seconds(lambda: training_step(model, images, labels, dtype))


def recipe_flops(params: TrainParams, examples: int = CIFAR_TRAIN, classes: int = 10,
                 side: int = 32) -> float:
    """Training FLOPs of a whole recipe on `examples` square images: each epoch's steps, as
    many as the loop takes (planned_steps, example selection), times a step's FLOPs at the
    image size and with the blocks frozen that loop.begin_epoch gives that epoch.
    Counts training only: not whitening, validation or TTA, all alike across recipes."""
    torch.manual_seed(0)
    model = build_model(params.arch, classes, (3, side, side)).train()
    images = torch.zeros(1, 3, side, side).expand(examples, -1, -1, -1)  # no memory: shapes only
    loader = BatchLoader(images, torch.arange(examples) % classes, params.batch_size,
        Sampling(crop_padding=0, flip=False, shuffle=False,
                 drop_last=examples >= params.batch_size, seed=0))
    training = Training(model, scratch_groups(model, params), params, loader,
                        Env(CPU, pick_precision(CPU, False)))
    per_image: dict[tuple, float] = {}
    total, steps_left = 0.0, training.total_steps
    for epoch in range(training.epochs):
        training.epoch = epoch
        # as in the run: frozen groups stop requiring gradients, the loader keeps the selected share
        size = begin_epoch(training) or (side, side)
        steps = min(steps_left, len(loader))
        steps_left -= steps
        key = (size, tuple(p.requires_grad for p in model.parameters()))
        if key not in per_image:
            batch = torch.zeros(COUNT_BATCH, 3, *size)
            labels = torch.zeros(COUNT_BATCH, dtype=torch.long)
            per_image[key] = step_flops(model, batch, labels, None) / COUNT_BATCH
        total += steps * min(params.batch_size, examples) * per_image[key]
    return total


def recipe_params(name: str, changes: dict[str, object], root: Path = ROOT) -> dict:
    """`default` is root's params.yaml with `changes`; any other name is that preset (in
    root/presets) on it."""
    if name != "default":
        return with_preset(root / "presets" / f"{name}.yaml", root / "params.yaml")
    params = read_yaml(root / "params.yaml")
    for key, value in changes.items():
        section, name = key.split(".")
        params[section][name] = value
    build(Params, params, "")
    return params
