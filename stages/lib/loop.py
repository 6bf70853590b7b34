"""The one training loop, shared by train and finetune, and the evaluation helpers.

The loop never syncs the host per step (no .item() per batch): losses, accuracies and the
first non-finite step are accumulated on the device and read once per epoch.
"""
from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from stages.lib.card import load_weights, torch_bytes
from stages.lib.clock import Stopwatch
from stages.lib.data import BatchLoader, Images, PackedImages, Sampling, StreamLoader, class_balance
from stages.lib.devices import Precision
from stages.lib.inference import autocast, loss_and_accuracy, predict_levels, predict_logits
from stages.lib.optim import (EMA_DECAY_BASE, EMA_DECAY_POW, Group, WeightAverage, lr_factor,
                              make_optimizer)
from stages.lib.outputs import StageError, atomic_file
from stages.lib.params import TrainParams
from stages.lib.ranks import Ranks, all_sum, wrap

MIN_RAMP_EPOCHS = 2  # progressive resizing: fewer epochs before full size is no ramp (progressive_size)


def training_loader(params: TrainParams, images: Images, labels: torch.Tensor, seed: int,
                    ranks: Ranks = Ranks()) -> BatchLoader:
    """Shuffled, augmented as `params` say, whole batches only (unless the set is smaller);
    streamed from the pack when the images are."""
    if params.flip == "auto":  # a truthy string: it would flip digits too
        raise ValueError("train.flip is still 'auto': resolve it for the data set (params.for_dataset)")
    sampling = Sampling(crop_padding=params.crop_padding, flip=params.flip, shuffle=True,
                        drop_last=len(labels) >= params.batch_size, seed=seed,
                        shard=(ranks.rank, ranks.world), balanced=params.sampler == "balanced")
    if isinstance(images, PackedImages):
        return StreamLoader(images, labels, params.batch_size, sampling, workers=params.workers)
    return BatchLoader(images, labels, params.batch_size, sampling)


def planned_steps(params: TrainParams, loader: BatchLoader) -> int:
    """The run's steps, for the lr schedule: whole-set epochs until `select_from`, then
    epochs over the selected share."""
    full = len(loader)
    if not params.select_from or params.select_from >= params.epochs:
        return math.ceil(full * params.epochs)
    kept = selected_count(params, len(loader.labels))
    selected = loader.batches(kept)
    if selected == 0:
        raise StageError(f"train.select_fraction: {params.select_fraction} of {len(loader.labels)} "
                         f"training images is {kept}, not one batch of {params.batch_size}; "
                         "raise it or lower train.batch_size")
    return math.ceil(full * params.select_from + selected * (params.epochs - params.select_from))


def selected_count(params: TrainParams, examples: int) -> int:
    return round(examples * params.select_fraction)


def make_criterion(params: TrainParams, labels: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Cross-entropy with label smoothing; with `class_weights: balanced` each sample weighs its
    class's balanced weight (data.class_balance), the batch's mean taken over those weights as
    CrossEntropyLoss(weight=...) does."""
    weights = class_balance(labels) if params.class_weights == "balanced" else None

    def criterion(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        losses = F.cross_entropy(logits, targets, label_smoothing=params.label_smoothing,
                                 reduction="none")
        if weights is None:
            return losses.mean()
        per_sample = weights[targets]
        return (losses * per_sample).sum() / per_sample.sum()

    return criterion


@dataclass
class Checkpoint:
    """Where the loop saves its state after each epoch, and the fingerprint it must match."""
    path: Path
    fingerprint: str


@dataclass(frozen=True)
class Env:
    """Where training runs: the device, the precision chosen for it, torchrun's ranks (one
    plain process without it) and the clock of the training time (None: a new one)."""
    device: torch.device
    precision: Precision
    ranks: Ranks = Ranks()
    watch: Stopwatch | None = None


class Training:
    """Runs the loop over epochs; state lives here so a checkpoint can restore all of it."""

    def __init__(self, model: nn.Module, groups: list[Group], params: TrainParams,
                 loader: BatchLoader, env: Env) -> None:
        self.model, self.groups, self.params, self.loader = model, groups, params, loader
        self.full_size = tuple(loader.images.shape[-2:])  # the training images' (height, width)
        self.device, self.precision, self.ranks = env.device, env.precision, env.ranks
        # the training time, airbench's way: sections timed by the stage (whitening), the
        # epochs and the final evaluation; not validation, checkpoints or set-up
        self.watch = env.watch or Stopwatch(env.device)
        self.optimizer = make_optimizer(params, groups)
        # fp16 (MPS) needs the loss scaled so that small gradients do not underflow; bf16 and
        # float32 have float32's range, and the scaler then does nothing
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=env.precision.dtype is torch.float16)
        # DDP-wrapped and compiled forward for training only; the state_dict is taken from the
        # plain module, so its keys carry no `module.` or `_orig_mod.` prefix.
        forward = wrap(model, env.ranks, env.device)
        self.forward = torch.compile(forward) if params.compile else forward
        # Frozen groups get no gradients in one eager process. A compiled graph would recompile
        # when requires_grad changes and DDP waits for every parameter's gradient, so there the
        # frozen keep theirs (at zero learning rate), paying for their compute.
        self.skip_frozen = env.ranks.world == 1 and not params.compile
        self.total_steps = planned_steps(params, loader)
        self.epochs = math.ceil(params.epochs)
        # example selection: each example's loss when it was last trained on (inf: not yet)
        self.losses = (torch.full((len(loader.labels),), math.inf, device=env.device)
                       if params.select_from else None)
        self.step = 0
        self.epoch = 0
        self.average: WeightAverage | None = None
        self.history: list[dict[str, float]] = []
        self.histograms: list[dict[str, list[dict]]] = []  # per epoch, as the logger drew them
        # the final validation's logits per level (None: not computed in this process yet)
        self.final_logits: dict[str, torch.Tensor] | None = None
        self.epochs_seconds = 0.0  # the epochs' part of the watch, for images per second
        self.criterion = make_criterion(params, loader.labels)

    def state(self) -> dict:
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "average": None if self.average is None else self.average.average,
            "step": self.step, "epoch": self.epoch, "history": self.history,
            "histograms": self.histograms,
            "loader_epoch": self.loader.epoch, "train_seconds": self.watch.seconds(),
            "epochs_seconds": self.epochs_seconds,
            "losses": None if self.losses is None else self.losses.cpu(),
            # bytes, not tensors: a map_location never moves them, and the generators take
            # only CPU byte tensors
            "loader_rng": rng_bytes(self.loader.generator.get_state()),
            "torch_rng": rng_bytes(torch.get_rng_state()),
        }

    def load_state(self, state: dict) -> None:
        """Restore a state loaded on the CPU: tensors go to the model's device (the optimizer
        moves its own), RNG states stay on the CPU."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if state["average"] is not None:
            self.average = WeightAverage(self.model)
            self.average.average = {k: v.to(self.device) for k, v in state["average"].items()}
        self.step, self.epoch, self.history = state["step"], state["epoch"], state["history"]
        self.histograms = state["histograms"]
        self.loader.epoch = state["loader_epoch"]
        self.watch.restore(state["train_seconds"])
        self.epochs_seconds = state["epochs_seconds"]
        if self.losses is not None:
            self.losses = state["losses"].to(self.device)
        self.loader.generator.set_state(rng_tensor(state["loader_rng"]))
        torch.set_rng_state(rng_tensor(state["torch_rng"]))


class EpochTotals:
    """An epoch's loss and accuracy sums and its first non-finite step, kept on the device (no
    host sync per step) and read once at the end, summed over ranks."""

    def __init__(self, device: torch.device) -> None:
        self.loss = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device, dtype=torch.int64)
        self.first_bad = torch.full((), -1, device=device, dtype=torch.int64)
        self.seen = 0

    def add(self, step: int, logits: torch.Tensor, loss: torch.Tensor, labels: torch.Tensor) -> None:
        bad = ~torch.isfinite(loss) & (self.first_bad < 0)
        self.first_bad = torch.where(bad, torch.full_like(self.first_bad, step), self.first_bad)
        self.loss += loss.detach() * len(labels)
        self.correct += (logits.argmax(1) == labels).sum()
        self.seen += len(labels)

    def read(self, ranks: Ranks) -> dict[str, float]:
        seen = torch.tensor(float(self.seen), device=self.loss.device)
        loss, correct, seen = all_sum(torch.stack([self.loss, self.correct.to(self.loss.dtype), seen]), ranks)
        return {"loss": loss.item() / seen.item(), "accuracy": correct.item() / seen.item()}


def train_one_epoch(training: Training) -> dict[str, float]:
    """One pass over the loader (torchvision's train_one_epoch, with the recipe's cuts, each a
    function of its own); returns the train loss and accuracy, read once at the end."""
    start_groups(training)  # progressive freezing (and finetune's frozen backbone)
    select_examples(training)  # example selection
    size = progressive_size(training)  # progressive resizing
    training.model.train()
    totals = EpochTotals(training.device)
    if training.losses is not None:  # this epoch's measured losses, and where it measured them
        measured = training.losses.new_zeros((2, len(training.losses)))
    for images, labels, index in tqdm(training.loader.indexed(), total=len(training.loader),
                                      desc=f"epoch {training.epoch + 1}/{training.epochs}",
                                      leave=False, mininterval=2):
        if training.step >= training.total_steps:
            break
        set_lr(training)
        if size is not None:
            images = F.interpolate(images, size=size, mode="bilinear", antialias=True)
        logits, loss = train_step(training, images, labels)
        if training.losses is not None:
            measured[0, index] = F.cross_entropy(logits.float(), labels, reduction="none")
            measured[1, index] = 1.0
        totals.add(training.step, logits, loss, labels)
        training.step += 1
        average_weights(training)  # weight averaging, every ema_every steps
    average_weights(training, epoch_end=True)
    if training.losses is not None:
        record_losses(training, measured)
    if totals.first_bad.item() >= 0:
        raise diverged(training, totals.first_bad.item() + 1)
    return totals.read(training.ranks)


def train_step(training: Training, images: torch.Tensor,
               labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    images = images.contiguous(memory_format=torch.channels_last)
    with autocast(training.device, training.precision.dtype):
        logits = training.forward(images)
        loss = training.criterion(logits.float(), labels)
    training.optimizer.zero_grad(set_to_none=True)
    training.scaler.scale(loss).backward()
    training.scaler.step(training.optimizer)
    training.scaler.update()
    return logits.detach(), loss.detach()


def diverged(training: Training, step: int) -> StageError:
    """The error for a non-finite loss, naming the precision where it was not float32."""
    where = f"training diverged: non-finite loss at epoch {training.epoch + 1}, step {step}"
    if training.precision.dtype is None:
        return StageError(f"{where}; lower train.lr (the last good checkpoint is kept)")
    return StageError(f"{where} in {training.precision.name} ({training.precision.reason}); "
                      "set train.amp: false to train in float32, or lower train.lr "
                      "(the last good checkpoint is kept)")


def set_lr(training: Training) -> None:
    """The schedule's learning rate for this step; zero (and no weight decay) for the groups
    outside their epochs."""
    params = training.params
    factor = lr_factor(params.schedule, training.step, training.total_steps, params.warmup)
    for group, spec in zip(training.groups, training.optimizer.param_groups):
        trains = group.trains_in(training.epoch)
        spec["lr"] = group.lr * factor if trains else 0.0
        spec["weight_decay"] = group.weight_decay if trains else 0.0
        spec["trains"] = trains


def logged_lr(training: Training) -> float:
    """The learning rate of the last step: the backbone's (zero while it is frozen), or the
    head's where the model has nothing else."""
    lrs = {g.name: spec["lr"] for g, spec in zip(training.groups, training.optimizer.param_groups)}
    return lrs.get("backbone", lrs["head"])


def start_groups(training: Training) -> None:
    """At an epoch's start: where frozen groups get no gradients (skip_frozen), a group outside
    its epochs stops requiring them, so backward skips what only it needed (the first conv's
    input gradient once the stem bias stops; finetune's whole backbone while the head trains
    alone). And a group that starts training now forgets any momentum it gathered while
    frozen, so it starts as if it had had no gradients until now."""
    for group in training.groups:
        if training.skip_frozen:
            for param in group.params:
                param.requires_grad_(group.trains_in(training.epoch))
        if training.epoch > 0 and group.start == training.epoch:
            for param in group.params:
                training.optimizer.state.pop(param, None)


def average_weights(training: Training, epoch_end: bool = False) -> None:
    """Every `ema_every` steps once past `ema_start`, and at each epoch's end so that the
    epoch ends on averaged weights. (airbench instead resets to the last average there,
    discarding up to ema_every - 1 steps: harmless at 97 steps an epoch, not at 3.)"""
    every = training.params.ema_every
    progress = training.step / training.total_steps
    if every == 0 or progress < training.params.ema_start:
        return
    if training.average is None:
        training.average = WeightAverage(training.model)
    elif (training.step % every == 0) != epoch_end:  # due now; or epoch end, not just done
        decay = EMA_DECAY_BASE ** every * progress ** EMA_DECAY_POW
        training.average.update(training.model, decay)


def progressive_size(training: Training) -> tuple[int, int] | None:
    """This epoch's training image size under progressive resizing (None: full size): the
    first epoch at `progressive_from` pixels high, growing linearly to the full height at
    `progressive_until` of the epochs, each side rounded to a multiple of `progressive_step`
    (never below the first). Fewer pixels, proportionally fewer FLOPs, while the network
    learns the coarse features that need no detail. The last epoch is always full size, and a
    ramp shorter than MIN_RAMP_EPOCHS is none: one small epoch and then a jump to full size
    costs more accuracy than it saves time."""
    params, (height, width) = training.params, training.full_size
    ramp = min(params.progressive_until * params.epochs, math.ceil(params.epochs) - 1)
    start = params.progressive_from
    if not start or ramp < MIN_RAMP_EPOCHS or training.epoch >= ramp or start >= height:
        return None
    step = params.progressive_step
    side = step * round((start + (height - start) * training.epoch / ramp) / step)
    if side >= height:
        return None
    return side, round(width * side / height)


def select_examples(training: Training) -> None:
    """At an epoch's start from `select_from` on: train on the `select_fraction` of the set
    with the highest loss when last seen. The easy examples the network already gets right
    teach it little; skipping them saves their steps (airbench96's selection, scored by the
    training steps' own losses instead of a proxy network's: stale by up to a few epochs,
    but free)."""
    if training.losses is None or training.epoch < training.params.select_from:
        return
    keep = selected_count(training.params, len(training.losses))
    training.loader.subset = torch.topk(training.losses, keep, sorted=False).indices


def record_losses(training: Training, measured: torch.Tensor) -> None:
    """At an epoch's end: keep the losses it measured (row 0, where row 1 is 1). Each rank
    measured its own share of every batch; summed over ranks, every rank keeps the same
    vector."""
    totals = all_sum(measured, training.ranks)
    training.losses = torch.where(totals[1] > 0, totals[0], training.losses)


def begin_epoch(training: Training) -> tuple[int, int] | None:
    """An epoch's set-up as train_one_epoch does it, without training: groups started or
    stopped, the examples selected; returns its image size (None: full size). bench.flops
    counts a recipe by it."""
    start_groups(training)
    select_examples(training)
    return progressive_size(training)


def rng_bytes(state: torch.Tensor) -> bytes:
    return state.cpu().numpy().tobytes()


def rng_tensor(data: bytes) -> torch.Tensor:
    """A generator state as the generators take it: a CPU byte tensor, whatever the
    checkpoint's map_location."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def save_checkpoint(checkpoint: Checkpoint, training: Training) -> None:
    payload = torch_bytes({"fingerprint": checkpoint.fingerprint, **training.state()})
    with atomic_file(checkpoint.path) as tmp:
        tmp.write_bytes(payload)


def resume(checkpoint: Checkpoint, training: Training) -> bool:
    """Restore a checkpoint written with the same fingerprint; a stale one is ignored."""
    if not checkpoint.path.exists():
        return False
    try:
        state = load_weights(checkpoint.path, "cpu")
    except StageError as err:
        raise StageError(f"{err}; delete this checkpoint to train from scratch") from None
    if state.get("fingerprint") != checkpoint.fingerprint:
        print(f"{checkpoint.path}: written for other params or data; starting from scratch")
        return False
    training.load_state(state)
    print(f"{checkpoint.path}: resuming after epoch {training.epoch} (step {training.step})")
    return True


def warm_up(training: Training, val: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    """One training step and one validation batch before the clock runs: compilation, cuDNN's
    kernel search and the allocator's growth are set-up, left out of airbench's timing too.
    Weights and optimizer state are put back and no random number is drawn, so the run is
    exactly the one it would have been without."""
    saved = copy.deepcopy({"model": training.model.state_dict(),
                           "optimizer": training.optimizer.state_dict(),
                           "scaler": training.scaler.state_dict()})
    loader, ranks = training.loader, training.ranks
    # the shape of a real batch, so that a compiled graph is reused, not recompiled
    index = torch.arange(min(loader.batch_size, len(loader.labels)), device=loader.labels.device)
    index = index[ranks.rank::ranks.world]
    training.model.train()
    train_step(training, loader.images[index], loader.labels[index])
    if val is not None:
        predict_logits(training.model, val[0][:training.params.eval_batch_size],
                       training.params.eval_batch_size, "none", training.precision.dtype)
    training.model.load_state_dict(saved["model"])
    training.optimizer.load_state_dict(saved["optimizer"])
    training.scaler.load_state_dict(saved["scaler"])


@contextlib.contextmanager
def naming_out_of_memory(training: Training) -> Iterator[None]:
    """An out-of-memory error becomes one message naming the knobs that fix it."""
    try:
        yield
    except torch.OutOfMemoryError:
        raise StageError(f"out of memory on {training.device} at epoch {training.epoch + 1} "
                         f"with batch_size {training.params.batch_size} (eval_batch_size "
                         f"{training.params.eval_batch_size}); lower them in params.yaml") from None


def final_levels(params: TrainParams) -> list[str]:
    """The TTA levels the final validation reports: plain, and `tta` where it adds views."""
    if params.tta == "auto":
        raise ValueError("train.tta is still 'auto': resolve it for the data set (params.for_dataset)")
    return list(dict.fromkeys(("none", params.tta)))


def validate(training: Training, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Validation logits after an epoch: plain, and after the last one the final validation."""
    if training.epoch + 1 >= training.epochs or training.step >= training.total_steps:
        return final_validation(training, images)
    return predict_levels(training.model, images, training.params.eval_batch_size, ["none"],
                          training.precision.dtype)


def final_validation(training: Training, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Logits at every final level, timed (airbench counts its final evaluation), computed
    once and kept for the final metrics."""
    if training.final_logits is None:
        with training.watch.section():
            training.final_logits = predict_levels(training.model, images,
                                                   training.params.eval_batch_size,
                                                   final_levels(training.params),
                                                   training.precision.dtype)
    return training.final_logits


def validation_due(training: Training) -> bool:
    """After every `eval_every`-th epoch, and after the last (called before the count moves on)."""
    every, done = training.params.eval_every, training.epoch + 1
    return done == training.epochs or (every > 0 and done % every == 0)


def fit(training: Training, val: tuple[torch.Tensor, torch.Tensor] | None,
        checkpoint: Checkpoint, log_epoch: Callable[[int, dict[str, float]], None]) -> None:
    """Train to the end, checkpointing each epoch; the training time adds up in training.watch
    (epochs only: not the warm-up, validation or checkpoints)."""
    resume(checkpoint, training)
    main = training.ranks.main
    for past, row in enumerate(training.history):
        log_epoch(past, row)
    # Warming up pays for itself where there is set-up to keep off the clock (compilation,
    # cuDNN's search, a GPU allocator's growth); an eager CPU run has none worth a step.
    if training.epoch < training.epochs and (training.device.type != "cpu" or training.params.compile):
        with naming_out_of_memory(training):
            warm_up(training, val if main else None)
    while training.epoch < training.epochs and training.step < training.total_steps:
        first_step, seconds_before = training.step, training.watch.seconds()
        with naming_out_of_memory(training):
            with training.watch.section():
                epoch = train_one_epoch(training)
            seconds = training.watch.seconds() - seconds_before
            training.epochs_seconds += seconds
            row = {"train/loss": epoch["loss"], "train/accuracy": epoch["accuracy"]}
            if main and val is not None and validation_due(training):
                logits = validate(training, val[0])["none"]
                row["val/loss"], row["val/accuracy"] = loss_and_accuracy(logits, val[1])
            row["lr"] = logged_lr(training)
        training.history.append(row)
        training.epoch += 1
        if not main:
            continue
        # the timings are logged, not kept in the history: a resumed run replays equal rows
        images = (training.step - first_step) * training.params.batch_size
        row = {**row, "epoch_seconds": seconds, "images_per_second": images / max(seconds, 1e-9)}
        log_epoch(training.epoch - 1, row)  # first: it may keep the epoch's plots in training
        save_checkpoint(checkpoint, training)
        print(f"epoch {training.epoch}/{training.epochs} "
              + " ".join(f"{k} {v:.4g}" for k, v in row.items())
              + f" (training {training.watch.seconds():.1f} s)")
