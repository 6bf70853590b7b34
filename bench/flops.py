"""FLOPs and FLOP/s: what a training step achieves against what the machine's matmul can.

The step's FLOPs are counted by torch's FlopCounterMode (convolutions and matmuls, forward and
backward: the work that matters) and divided by its median time on the CPU; the peak is a
large square matmul in the same precision, timed in the same process.
"""
from __future__ import annotations

import functools
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from stages.devices import keep_freed_memory, pick_precision
from stages.loop import autocast
from stages.model import build_model
from stages.params import Amp

CPU = torch.device("cpu")
PEAK_SIDE = 4096  # large enough that the matmul runs at its best on every CPU kind measured
REPEATS = 3


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


if __name__ == "__main__":  # python -m bench.flops: the default step at full and lower sizes
    from stages.devices import cpu_summary
    from stages.params import load_params

    train = load_params().train
    dtype = pick_precision(CPU, train.amp).dtype
    print(f"CPU {cpu_summary()}; matmul peak {matmul_peak(dtype) / 1e9:.0f} GFLOP/s")
    for side in (32, 28, 24, 20, 16):
        model = build_model(train.arch, 10, (3, side, side))
        images = torch.randn(train.batch_size, 3, side, side)
        flops = step_flops(model, images, torch.zeros(train.batch_size, dtype=torch.long), dtype)
        print(f"{train.arch} {side}x{side}, batch {train.batch_size}: {flops / train.batch_size / 1e6:.0f} "
              f"MFLOP per image, {step_throughput(train.arch, train.batch_size, train.amp, side) / 1e9:.0f} GFLOP/s")
