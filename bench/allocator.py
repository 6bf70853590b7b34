"""Benchmark: a CPU training step under glibc malloc's default against the memory kept
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

import dataclasses
import functools
import platform
import statistics

import torch

from bench.alternate import arguments, take_turns
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


def main() -> None:
    args = arguments(__doc__, images=45000)
    if platform.libc_ver()[0] != "glibc":
        raise SystemExit("bench.allocator: measures glibc's malloc; this C library is not glibc")
    # a step costs the same whichever examples selection would pick: without it, any --images
    # down to one batch will do
    params, cpu = dataclasses.replace(load_params().train, select_from=0), torch.device("cpu")
    torch.manual_seed(0)
    images, labels = torch.randn(args.images, 3, 32, 32), torch.randint(0, 10, (args.images,))
    model = fresh_model(params.arch, 10, images)
    precision = pick_precision(cpu, params.amp)
    training = Training(model, scratch_groups(model, params), params,
                        training_loader(params, images, labels, params.seed), cpu, precision)
    print(f"CPU {cpu_summary()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{params.arch} step, batch {params.batch_size}, optimizer {params.optimizer}, "
          f"{precision.name}")
    settings = {name: functools.partial(mallopt, setting) for name, setting in SETTINGS.items()}
    seconds, faults = take_turns(training, settings, args.rounds, args.steps)
    base = statistics.median(seconds["glibc default"])
    for name in SETTINGS:
        step = statistics.median(seconds[name])
        print(f"{name:<14} {step:.3f} s a step ({base / step:.2f}x), "
              f"{statistics.median(faults[name]):.0f} page faults a step")


if __name__ == "__main__":
    main()
