"""Benchmark: the train stage's CPU step at each progressive-resizing size, with the conv
weight gradients of small maps taken as one matrix product (stages.model.PatchMatmulConv,
what training does) against oneDNN's kernel for all of them (Conv3x3.MATMUL_WGRAD_UP_TO = 0).

usage: python -m bench.small_maps [--images 12000] [--rounds 3] [--steps 3]
                                  [--arch resnet18] [--batch-size 1024]

params.yaml's train recipe (or its network or batch size changed), on batches of random
images held in memory at each size its epochs train at (16 px up to full size), without
selection or freezing. Both settings run in this one process, alternating round by round;
each round's first step is left out. Prints each size's median step time under both and their
ratio, then the same summed over the recipe's epochs (one step of each epoch at its size). The
path needs bf16 autocast on the CPU; under float32 the two settings are the same code.
"""
from __future__ import annotations

import dataclasses
import math
import statistics

import torch

from bench.alternate import arguments, take_turns
from stages.devices import cpu_summary, keep_freed_memory, pick_precision
from stages.loop import Training, scratch_groups, training_loader
from stages.model import Conv3x3, fresh_model
from stages.params import TrainParams, load_params

CPU = torch.device("cpu")
FULL = 32  # CIFAR's height and width
BOUND = Conv3x3.MATMUL_WGRAD_UP_TO  # the training's; the baseline sets 0


def epoch_sizes(params: TrainParams) -> list[int]:
    """The image side each epoch of `params` trains at (progressive resizing's schedule)."""
    training = scratch_training(params, torch.randn(2, 3, FULL, FULL),
                                torch.zeros(2, dtype=torch.long))
    sizes = []
    for epoch in range(math.ceil(params.epochs)):
        training.epoch = epoch
        sizes.append((training.image_size() or (FULL, FULL))[0])
    return sizes


def scratch_training(params: TrainParams, images: torch.Tensor, labels: torch.Tensor) -> Training:
    """The train stage's Training from scratch on `images`, at its first epoch."""
    model = fresh_model(params.arch, 10, images)
    return Training(model, scratch_groups(model, params), params,
                    training_loader(params, images, labels, params.seed), CPU,
                    pick_precision(CPU, params.amp))


def bound(pixels: int) -> None:
    """Maps of up to `pixels` take the patch matmul (0: none)."""
    Conv3x3.MATMUL_WGRAD_UP_TO = pixels


def main() -> None:
    args = arguments(__doc__, images=12000, recipe=True)
    keep_freed_memory()
    torch.manual_seed(0)
    train = load_params().train
    # selection and freezing change no image size (and resnet18 has no blocks to freeze)
    train = dataclasses.replace(train, arch=args.arch or train.arch, select_from=0, freeze_from=0,
                                batch_size=args.batch_size or train.batch_size)
    sizes = epoch_sizes(train)
    steady = dataclasses.replace(train, progressive_from=0)
    print(f"CPU {cpu_summary()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{train.arch} step, batch {train.batch_size}, optimizer {train.optimizer}, "
          f"{pick_precision(CPU, train.amp).name}; epochs at {sizes} px")
    settings = {"oneDNN": lambda: bound(0),
                "patch matmul": lambda: bound(BOUND)}
    medians: dict[int, dict[str, float]] = {}
    for side in sorted(set(sizes)):
        training = scratch_training(steady, torch.randn(args.images, 3, side, side),
                                    torch.randint(0, 10, (args.images,)))
        seconds, _ = take_turns(training, settings, args.rounds, args.steps)
        medians[side] = {name: statistics.median(s) for name, s in seconds.items()}
        old, new = medians[side]["oneDNN"], medians[side]["patch matmul"]
        print(f"{side:>2} px: oneDNN {old:.3f} s a step, patch matmul {new:.3f} s ({new / old:.2f})")
    old, new = (sum(medians[side][name] for side in sizes) for name in settings)
    print(f"the recipe's {len(sizes)} epochs, a step of each: oneDNN {old:.3f} s, patch matmul "
          f"{new:.3f} s ({new / old:.2f})")


if __name__ == "__main__":
    main()
