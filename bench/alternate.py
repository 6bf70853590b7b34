"""For the benches that time one training step under several settings in one process
(bench.allocator, bench.frozen): the settings take turns round by round, so that a drifting
machine slows all alike, and each turn's first step, which moves into the setting, is left out."""
from __future__ import annotations

import argparse
import itertools
import resource
import time
from typing import Callable

from stages.loop import Training
from stages.params import ARCH_NAMES


def arguments(doc: str, images: int, recipe: bool = False) -> argparse.Namespace:
    """--images (random CIFAR-sized ones held in memory), --rounds, --steps (timed a turn);
    with `recipe`, --arch and --batch-size too (None: params.yaml's)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--images", type=int, default=images)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    if recipe:
        parser.add_argument("--arch", choices=ARCH_NAMES)
        parser.add_argument("--batch-size", type=int)
    return parser.parse_args()


def page_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def take_turns(training: Training, settings: dict[str, Callable[[], None]], rounds: int,
               steps: int) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
    """Each setting's step times in seconds and page faults, `rounds` x `steps` of each."""
    batches = itertools.chain.from_iterable(itertools.repeat(training.loader))  # epoch after epoch
    seconds: dict[str, list[float]] = {name: [] for name in settings}
    faults: dict[str, list[int]] = {name: [] for name in settings}
    for _ in range(rounds):
        for name, enter in settings.items():
            enter()
            training.train_step(*next(batches))  # settles into the setting
            for _ in range(steps):
                batch = next(batches)
                before, start = page_faults(), time.perf_counter()
                training.train_step(*batch)
                seconds[name].append(time.perf_counter() - start)
                faults[name].append(page_faults() - before)
    return seconds, faults
