"""Benchmark: CPU training steps while a parameter group is frozen, its gradients skipped
(what one eager process does: Training.skip_frozen) against computed at zero learning rate
(what compiled and distributed runs do).

usage: python -m bench.frozen [--images 20000] [--rounds 3] [--steps 3]

Four steps of params.yaml's recipes, on batches of random CIFAR-sized images at full size:
- train, after `whiten_bias_epochs`: the stem bias frozen, so nothing before the first conv
  needs a gradient;
- train with progressive freezing (`freeze_from`), its first one and first two blocks
  stopped: computed at rate 0 costs what a step training them does, so the ratio is what
  freezing them saves;
- finetune, in its head-only epochs (`freeze_epochs`): everything but the head frozen.
Both settings run in this one process, alternating round by round; each round's first step
is left out. Prints the median step time of each and their ratio.
"""
from __future__ import annotations

import dataclasses
import functools
import statistics

import torch

from bench.alternate import arguments, take_turns
from stages.devices import Precision, cpu_summary, keep_freed_memory, pick_precision
from stages.loop import Training, param_groups, scratch_groups, training_loader
from stages.model import fresh_model
from stages.params import TrainParams, load_params

CPU = torch.device("cpu")


def trainings(images: torch.Tensor, labels: torch.Tensor) -> dict[str, Training]:
    """The train stage's step past its stem-bias epochs, alone and with one and two blocks
    frozen from then on, and finetune's head-only step."""
    params = load_params()
    train = params.train
    tune = dataclasses.replace(train, batch_size=params.finetune.batch_size, progressive_from=0)
    precision = pick_precision(CPU, train.amp)
    runs = {"train": scratch_training(train, images, labels, precision)}
    for blocks in (1, 2):
        frozen = dataclasses.replace(train, freeze_from=train.whiten_bias_epochs, freeze_blocks=blocks)
        training = scratch_training(frozen, images, labels, precision)
        training.epoch += blocks - 1  # one block an epoch: the epoch the last of them stops
        runs[f"train, {blocks} block(s) frozen"] = training
    model = fresh_model(train.arch, 10, images)
    groups = param_groups(model, params.finetune.lr, params.finetune.head_lr, train.weight_decay,
                          train.bias_lr_scale, freeze_epochs=params.finetune.freeze_epochs,
                          whiten_bias_epochs=0)
    runs["finetune"] = Training(model, groups, tune, training_loader(tune, images, labels, 0),
                                CPU, precision)
    return runs


def scratch_training(train: TrainParams, images: torch.Tensor, labels: torch.Tensor,
                     precision: Precision) -> Training:
    """The train stage's Training, at the first epoch past the stem bias's."""
    model = fresh_model(train.arch, 10, images)
    training = Training(model, scratch_groups(model, train), train,
                        training_loader(train, images, labels, train.seed), CPU, precision)
    training.epoch = train.whiten_bias_epochs
    return training


def freeze(training: Training, skip: bool) -> None:
    """Frozen groups' gradients skipped (as one eager process does) or computed."""
    training.skip_frozen = skip
    for group in training.groups:
        for param in group.params:
            param.requires_grad_(True)  # as the groups were built
    training.start_groups()
    training.set_lr()  # the frozen groups at rate 0, as in the loop


def main() -> None:
    args = arguments(__doc__, images=20000)
    keep_freed_memory()
    torch.manual_seed(0)
    images, labels = torch.randn(args.images, 3, 32, 32), torch.randint(0, 10, (args.images,))
    print(f"CPU {cpu_summary()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, training in trainings(images, labels).items():
        settings = {"skipped": functools.partial(freeze, training, True),
                    "computed": functools.partial(freeze, training, False)}
        seconds, _ = take_turns(training, settings, args.rounds, args.steps)
        kept, skipped = (statistics.median(seconds[s]) for s in ("computed", "skipped"))
        print(f"{name} (batch {training.params.batch_size}, epoch {training.epoch + 1}): frozen "
              f"gradients computed {kept:.3f} s a step, skipped {skipped:.3f} s ({kept / skipped:.2f}x)")


if __name__ == "__main__":
    main()
