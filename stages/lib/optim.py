"""Optimizers and their parameter groups: each group trains at its own learning rate during its
own epochs (progressive freezing, the stem bias, finetune's frozen backbone), the learning-rate
schedule, Muon, and the weight averaging the recipe applies."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from stages.lib.archs import registry
from stages.lib.nets import Architecture
from stages.lib.params import TrainParams

# Triangle schedule ends, as airbench: start at 0.2 x lr, peak at `warmup`, end at 0.07 x lr.
TRIANGLE_START, TRIANGLE_END = 0.2, 0.07


# Weight averaging (airbench's lookahead-style EMA): per-update decay 0.95^every, scaled by
# (progress)^3 so it averages lightly early and strongly at the end.
EMA_DECAY_BASE, EMA_DECAY_POW = 0.95, 3.0


@dataclass
class Group:
    """A set of parameters with its own learning rate, trained during epochs [start, stop).

    Outside those epochs its learning rate and weight decay are zero, and in one eager process
    its parameters also stop requiring gradients (loop.start_groups), so that backward
    skips the work only they needed."""
    name: str
    params: list[nn.Parameter]
    lr: float
    weight_decay: float
    start: int = 0
    stop: int | None = None
    orthogonal: bool = False  # stepped by Muon (conv filters, with optimizer muon)

    def trains_in(self, epoch: int) -> bool:
        return epoch >= self.start and (self.stop is None or epoch < self.stop)


@dataclass(frozen=True)
class Rates:
    """The learning rates and schedule of param_groups' groups (see there)."""
    lr: float
    head_lr: float
    weight_decay: float
    bias_lr_scale: float
    freeze_epochs: int = 0
    whiten_bias_epochs: int = 0
    muon_lr: float | None = None


def param_groups(model: Architecture, rates: Rates) -> list[Group]:
    """Group the trainable parameters by the role the architecture gives each (nets.py).

    "norm_bias" (airbench's frozen-scale BatchNorm biases) trains at lr * bias_lr_scale (64
    there), its weight decay divided by the same factor so that the per-step decay lr * wd
    stays that of the rest; "stem_bias" likewise, and only until `whiten_bias_epochs`. The
    backbone waits `freeze_epochs` (finetune). With `muon_lr`, the backbone's conv filters
    form their own group, stepped by Muon at that rate, without weight decay (Muon keeps
    their norm fixed instead).
    """
    buckets: dict[str, list[nn.Parameter]] = {
        "head": [], "norm_bias": [], "stem_bias": [], "backbone": [], "filters": []}
    parameters = dict(model.named_parameters())
    for name, role in model.roles().items():
        param = parameters[name]
        filters = rates.muon_lr is not None and role == "backbone" and param.ndim == 4
        buckets["filters" if filters else role].append(param)
    r, start = rates, rates.freeze_epochs
    bias_lr, bias_decay = r.lr * r.bias_lr_scale, r.weight_decay / r.bias_lr_scale
    groups = [
        Group("head", buckets["head"], r.head_lr, r.weight_decay),
        Group("norm_bias", buckets["norm_bias"], bias_lr, bias_decay, start=start),
        Group("stem_bias", buckets["stem_bias"], bias_lr, bias_decay, start=start,
              stop=max(start, r.whiten_bias_epochs)),
        Group("backbone", buckets["backbone"], r.lr, r.weight_decay, start=start),
        Group("filters", buckets["filters"], r.muon_lr or 0.0, 0.0, start=start, orthogonal=True),
    ]
    return [g for g in groups if g.params]


def scratch_groups(model: Architecture, params: TrainParams) -> list[Group]:
    """The groups of a run from scratch: everything trains from the start at `lr` (the conv
    filters at `muon_lr` with optimizer muon), the leading blocks one by one from `freeze_from`."""
    muon_lr = params.muon_lr if params.optimizer == "muon" else None
    groups = param_groups(model, Rates(params.lr, params.lr, params.weight_decay, params.bias_lr_scale,
                                       whiten_bias_epochs=params.whiten_bias_epochs, muon_lr=muon_lr))
    if not params.freeze_from:
        return groups
    blocks = registry()[params.arch].blocks[:params.freeze_blocks]  # params checked there are enough
    return freeze_leading(groups, model, blocks, params.freeze_from)


def freeze_leading(groups: list[Group], model: Architecture, blocks: tuple[str, ...],
                   epoch: int) -> list[Group]:
    """Progressive freezing (FreezeOut, Brock et al. 2017): the first of `blocks` (key
    prefixes, from the input on) stops training at `epoch`, the next one an epoch later. The
    layers nearest the input settle first; once they stop, and nothing before them trains,
    backward skips their weight gradients, their input gradients and the input gradient of the
    layer after them: for airbench's first block, a fifth of a full-size step's FLOPs, for its
    first two, over half. Each group is split by block, each block's part stopping at its epoch."""
    stops = {id(p): epoch + block
             for block, prefix in enumerate(blocks)
             for name, p in model.named_parameters() if name.startswith(prefix)}
    split = []
    for group in groups:
        rest = [p for p in group.params if id(p) not in stops]
        if rest:
            split.append(replace(group, params=rest))
        for block, stop in enumerate(range(epoch, epoch + len(blocks))):
            leading = [p for p in group.params if stops.get(id(p)) == stop]
            if leading:  # a group stopping sooner on its own (the stem bias) keeps its stop
                split.append(replace(group, name=f"{group.name}_block{block}", params=leading,
                                     stop=stop if group.stop is None else min(group.stop, stop)))
    return split


def lr_factor(schedule: str, step: int, total: int, warmup: float) -> float:
    """Multiplier of each group's lr at `step` of `total`."""
    progress = step / max(total, 1)
    if schedule == "constant":
        return 1.0
    if schedule == "triangle":
        if progress < warmup:
            return TRIANGLE_START + (1 - TRIANGLE_START) * progress / warmup
        return 1 + (TRIANGLE_END - 1) * (progress - warmup) / (1 - warmup)
    if schedule == "cosine":
        if progress < warmup:
            return progress / warmup
        return 0.5 * (1 + math.cos(math.pi * (progress - warmup) / (1 - warmup)))
    raise AssertionError(schedule)


def make_optimizer(params: TrainParams, groups: list[Group]) -> torch.optim.Optimizer:
    specs = [{"params": g.params, "lr": g.lr, "weight_decay": g.weight_decay} for g in groups]
    if params.optimizer == "muon":
        for group, spec in zip(groups, specs):
            if group.orthogonal:
                spec.update(orthogonal=True, momentum=params.muon_momentum)
        return Muon(specs, momentum=params.momentum, nesterov=params.nesterov)
    if params.optimizer == "sgd":
        return torch.optim.SGD(specs, momentum=params.momentum, nesterov=params.nesterov)
    return torch.optim.Adam(specs, betas=(params.momentum, 0.999))


# Newton-Schulz: a quintic whose coefficients maximise the slope at zero (airbench94_muon's):
# three iterations take every singular value of a norm-1 matrix into roughly [0.5, 1.5].
NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)


NEWTON_SCHULZ_STEPS = 3


def orthogonalize(update: torch.Tensor) -> torch.Tensor:
    """About U V^T of the matrix's SVD U S V^T: its direction with every singular value ~1.
    In float32: its few matrix products are small beside a training step's convolutions."""
    a, b, c = NEWTON_SCHULZ
    x = update.float()
    x = x / (x.norm() + 1e-7)
    wide = x.size(0) <= x.size(1)
    x = x if wide else x.T
    for _ in range(NEWTON_SCHULZ_STEPS):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x if wide else x.T


class Muon(torch.optim.Optimizer):
    """SGD with momentum, except for `orthogonal` groups (conv filters), which step along
    their orthogonalised momentum (Muon; KellerJordan/cifar10-airbench's airbench94_muon):
    every direction of the filter bank moves at the same rate, so the same accuracy takes
    fewer steps. Their weights are rescaled to norm sqrt(output channels) before each step (a
    filter's norm is 1 on average), so `lr` is a relative step size and they need no weight
    decay."""

    def __init__(self, specs: list[dict], momentum: float, nesterov: bool) -> None:
        super().__init__(specs, {"momentum": momentum, "nesterov": nesterov, "weight_decay": 0.0,
                                 "orthogonal": False, "trains": True})

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        for group in self.param_groups:
            momentum, lr = group["momentum"], group["lr"]
            if not group["trains"]:  # frozen, its gradients computed (DDP, compile): left as it is,
                continue             # not even rescaled
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad.add(param, alpha=group["weight_decay"]) if group["weight_decay"] else param.grad
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = grad.clone()
                else:
                    state["momentum_buffer"].mul_(momentum).add_(grad)
                buffer = state["momentum_buffer"]
                update = grad.add(buffer, alpha=momentum) if group["nesterov"] else buffer
                if group["orthogonal"]:
                    param.mul_(len(param) ** 0.5 / param.norm())
                    update = orthogonalize(update.reshape(len(param), -1)).view_as(param)
                param.add_(update, alpha=-lr)


class WeightAverage:
    """Lookahead-style EMA (airbench): average the weights, then copy the average back."""

    def __init__(self, model: nn.Module) -> None:
        self.average = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float) -> None:
        for key, value in model.state_dict().items():
            if value.is_floating_point():
                self.average[key].lerp_(value, 1 - decay)
                value.copy_(self.average[key])
