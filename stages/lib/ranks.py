"""torchrun's ranks: joining and leaving the process group, DDP around the model, sums over
ranks. One plain process without torchrun."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from stages.lib.devices import pick_device
from stages.lib.outputs import StageError


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """Rank 0 alone logs, checkpoints and writes outputs."""
        return self.rank == 0


def start(device_name: str, batch_size: int) -> tuple[Ranks, torch.device]:
    """Join torchrun's process group if launched by it; returns the ranks and this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_name)
    if world == 1:
        return Ranks(), device
    if batch_size % world:
        raise StageError(f"params: batch_size {batch_size} must be divisible by the {world} "
                         "processes torchrun started, so that the global batch stays the same")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Ranks(dist.get_rank(), world), device


def stop(done: bool) -> None:
    """Leave torchrun's process group; when `done`, only once every rank is done (a rank that
    leaves while rank 0 still validates and saves can abort gloo under it)."""
    if dist.is_initialized():
        if done:
            dist.barrier()
        dist.destroy_process_group()


def wrap(model: nn.Module, ranks: Ranks, device: torch.device) -> nn.Module:
    """DDP around `model` when there are several ranks. There frozen groups keep requires_grad
    (the loop zeroes their learning rate instead), so every parameter gets a gradient each step
    and DDP needs no search for unused ones."""
    if ranks.world == 1:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=True)


def all_sum(tensor: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """Sum a tensor over ranks (in place); unchanged for one process."""
    if ranks.world > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor
