"""Where the work runs: the one place that picks the device, and several processes (GPUs or
machines) through PyTorch's own DDP, launched by torchrun.

Without torchrun's environment (WORLD_SIZE unset or 1) everything here is a no-op and the
stages run as one plain process. Under torchrun each rank holds the whole split on its
device and takes its share of every global batch (data.BatchLoader's `shard`), so the
global batch size stays `batch_size` whatever the number of ranks.

BatchNorm: statistics are per rank (each normalizes its share of the batch), and DDP
broadcasts rank 0's running statistics every step (broadcast_buffers). We do not convert to
SyncBatchNorm: it costs an all-reduce per BN layer per step, and at the per-rank batch sizes
this recipe uses (>= 128) local statistics are already stable.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from stages.outputs import StageError


def pick_device(name: str) -> torch.device:
    """`auto` takes CUDA, then MPS, then CPU; an explicit device that is absent is an error."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if name == "auto":
        return torch.device(next(d for d in ("cuda", "mps", "cpu") if available[d]))
    if not available[name]:
        raise StageError(f"params: device {name!r} is not available on this machine; "
                         "set it to auto or cpu")
    return torch.device(name)


class Stopwatch:
    """Seconds since start, as the device sees them. CUDA queues kernels and returns at once,
    so a host clock would time the queueing: there, events recorded on the stream time the
    work. Reading waits for the device; the loop reads only at epoch ends."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.start_event = None
        if device.type == "cuda":
            self.start_event = torch.cuda.Event(enable_timing=True)
            self.start_event.record()
        self.start = time.perf_counter()

    def seconds(self) -> float:
        if self.start_event is not None:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            end.synchronize()
            return self.start_event.elapsed_time(end) / 1000  # milliseconds
        if self.device.type == "mps":
            torch.mps.synchronize()
        return time.perf_counter() - self.start


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


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, ranks: Ranks, device: torch.device, trainable: list[nn.Parameter]) -> nn.Module:
    """DDP around `model` when there are several ranks.

    Every parameter that trains at some point must require grad while DDP registers its
    hooks, or its gradients would never be averaged; the loop then switches groups on and off
    per epoch, which is why unused parameters are searched for.
    """
    if ranks.world == 1:
        return model
    for param in trainable:
        param.requires_grad_(True)
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=True,
                                               find_unused_parameters=True)


def all_sum(tensor: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """Sum a tensor over ranks (in place); unchanged for one process."""
    if ranks.world > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor
