"""Benchmark 5: a CPU training step under glibc malloc's default against the memory kept
(stages.devices.keep_freed_memory, which every stage on the CPU sets).

usage: python -m bench.allocator [--images 45000] [--rounds 3] [--steps 3]

The step is the train stage's (stages.loop.Training with params.yaml's train section: its
network, batch size, optimizer and precision), on batches of a CIFAR-sized set of random
images held in memory as the stage holds its training split.

Both settings run in this one process, alternating round by round so that a drifting machine
slows both alike: the default's steady state (blocks of >= 32 MiB mmapped, and unmapped when
freed; glibc reaches it after the first large free) against no mmap and no trimming. Each
round's first step, which moves the heap from one setting to the other, is left out. Prints
the median step time of each, their ratio and the page faults per step.
"""
from __future__ import annotations

import argparse
import itertools
import platform
import resource
import statistics
import time

import torch

from stages.devices import (KEEP_FREED, M_MMAP_MAX, M_TRIM_THRESHOLD, cpu_summary, mallopt,
                            pick_precision)
from stages.loop import Training, scratch_groups, training_loader
from stages.model import fresh_model
from stages.params import load_params

M_MMAP_THRESHOLD = -3
GLIBC_MMAP_MAX = 65536
GLIBC_MMAP_THRESHOLD_MAX = 32 * 2 ** 20  # the dynamic threshold's ceiling on 64-bit glibc
SETTINGS = {  # mallopt values; glibc's dynamic trim threshold is twice the mmap threshold
    "glibc default": {M_MMAP_MAX: GLIBC_MMAP_MAX, M_MMAP_THRESHOLD: GLIBC_MMAP_THRESHOLD_MAX,
                      M_TRIM_THRESHOLD: 2 * GLIBC_MMAP_THRESHOLD_MAX},
    "memory kept": KEEP_FREED,
}


def page_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=45000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    if platform.libc_ver()[0] != "glibc":
        raise SystemExit("bench.allocator: measures glibc's malloc; this C library is not glibc")
    params, cpu = load_params().train, torch.device("cpu")
    torch.manual_seed(0)
    images, labels = torch.randn(args.images, 3, 32, 32), torch.randint(0, 10, (args.images,))
    model = fresh_model(params.arch, 10, images)
    precision = pick_precision(cpu, params.amp)
    training = Training(model, scratch_groups(model, params), params,
                        training_loader(params, images, labels, params.seed), cpu, precision)
    batches = itertools.chain.from_iterable(itertools.repeat(training.loader))  # epoch after epoch
    print(f"CPU {cpu_summary()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{params.arch} step, batch {params.batch_size}, optimizer {params.optimizer}, "
          f"{precision.name}")
    seconds: dict[str, list[float]] = {name: [] for name in SETTINGS}
    faults: dict[str, list[int]] = {name: [] for name in SETTINGS}
    for _ in range(args.rounds):
        for name, setting in SETTINGS.items():
            mallopt(setting)
            training.train_step(*next(batches))  # the heap settles into the setting
            for _ in range(args.steps):
                batch = next(batches)
                before, start = page_faults(), time.perf_counter()
                training.train_step(*batch)
                seconds[name].append(time.perf_counter() - start)
                faults[name].append(page_faults() - before)
    base = statistics.median(seconds["glibc default"])
    for name in SETTINGS:
        step = statistics.median(seconds[name])
        print(f"{name:<14} {step:.3f} s a step ({base / step:.2f}x), "
              f"{statistics.median(faults[name]):.0f} page faults a step")


if __name__ == "__main__":
    main()
