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

import ctypes
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from stages.lib.outputs import StageError
from stages.lib.params import parse_bytes


def pick_device(name: str) -> torch.device:
    """`auto` takes CUDA, then MPS, then CPU, and says why when a CUDA build finds no GPU; an
    explicit device that is absent is an error."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if name == "auto":
        name = next(d for d in ("cuda", "mps", "cpu") if available[d])
        if name == "cpu" and torch.version.cuda is not None:
            print(f"device auto: torch {torch.__version__} is built for CUDA {torch.version.cuda}, "
                  "but no GPU can be used (none is visible, or its driver is older than that CUDA; "
                  "see nvidia-smi); running on the CPU", file=sys.stderr)
    elif not available[name]:
        raise StageError(f"params: device {name!r} is not available on this machine; "
                         "set it to auto or cpu")
    if name == "cuda":
        # The input shapes are fixed, so cuDNN's one-time search for the fastest kernels pays.
        torch.backends.cudnn.benchmark = True
    if name == "cpu":
        keep_freed_memory()
    return torch.device(name)


def free_memory(device: torch.device) -> int:
    """Bytes the device has free now: the GPU's own memory, else the machine's available
    memory (Linux's MemAvailable: free plus reclaimable cache)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "mps":
        return torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory()
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):  # not Linux: the physical memory's quarter, a guess
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4


def memory_budget(setting: str, device: torch.device) -> int:
    """train.memory_budget in bytes: the size given, or half the device's free memory."""
    return free_memory(device) // 2 if setting == "auto" else parse_bytes(setting)


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
TRIM_THRESHOLD = 2 ** 31 - 1  # mallopt's largest: more than a step's activations ever free
KEEP_FREED = {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: TRIM_THRESHOLD}  # no mmap, no trimming


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for the next allocation instead of handing it
    back to the kernel; returns whether this C library is glibc (the others: nothing to do).

    By default glibc serves every block of >= 32 MiB (a CPU training step's activations,
    gradients and pooling indices) with a fresh mmap and unmaps it when freed, so each step
    page-faults through all of them again, the kernel zeroing every 4 KiB page (a step's
    time grows by a good fraction: docs/performance.md). Served from the heap and never
    trimmed, the next step reuses the same pages. The process keeps its peak memory until it
    exits, which a stage does when done."""
    if platform.libc_ver()[0] != "glibc":
        return False
    mallopt(KEEP_FREED)
    return True


def mallopt(settings: dict[int, int]) -> None:
    """Set glibc malloc's options (malloc.h's M_* numbers to their values)."""
    libc = ctypes.CDLL(None)
    for option, value in settings.items():
        if libc.mallopt(option, value) != 1:
            raise RuntimeError(f"glibc mallopt({option}, {value}) refused")


@dataclass(frozen=True)
class Precision:
    """The autocast dtype a stage computes in (None: float32), and why it was chosen."""
    dtype: torch.dtype | None
    reason: str

    @property
    def name(self) -> str:
        return "float32" if self.dtype is None else str(self.dtype).removeprefix("torch.")


def cpu_model() -> str:
    """The CPU's model name, as /proc/cpuinfo gives it (platform's guess elsewhere)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The instruction sets that decide a CPU's speed at each precision, as torch detects them."""
    checks = {"AVX2": torch.cpu._is_avx2_supported, "AVX512": torch.cpu._is_avx512_supported,
              "AVX512_BF16": torch.cpu._is_avx512_bf16_supported, "AMX": torch.cpu._is_amx_tile_supported}
    return [flag for flag, supported in checks.items() if supported()]


def pick_precision(device: torch.device, amp: bool | str) -> Precision:
    """`auto`: bf16 autocast where the device computes bf16 natively (a CUDA GPU that has it; a
    CPU with AMX or AVX512_BF16), fp16 on MPS, float32 everywhere else. Elsewhere bf16 is
    emulated, many times slower than float32 (docs/performance.md).
    Decided from the hardware alone, no timing, so a rerun on the same machine decides alike.
    `true` / `false` force autocast (bf16; fp16 on MPS) on / off."""
    half = torch.float16 if device.type == "mps" else torch.bfloat16
    if amp is True or amp is False:
        return Precision(half if amp else None, f"amp: {str(amp).lower()}")
    if device.type == "mps":
        return Precision(half, "amp auto: MPS computes fp16 natively")
    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return Precision(half, f"amp auto: {gpu} computes bf16 natively")
        return Precision(None, f"amp auto: {gpu} has no native bf16")
    native = [flag for flag in ("AMX", "AVX512_BF16") if flag in cpu_flags()]
    if native:
        return Precision(half, f"amp auto: the CPU has {' and '.join(native)}")
    return Precision(None, "amp auto: the CPU has neither AMX nor AVX512_BF16, so bf16 would be emulated")


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def cpu_summary() -> str:
    """The CPU model and its deciding flags, as printed beside every figure."""
    return f"{cpu_model()}: {' '.join(cpu_flags()) or 'no AVX2, AVX-512 or AMX'}"


def hardware(device: torch.device, precision: Precision) -> dict[str, object]:
    """What a stage ran on, for its model.json and metrics file."""
    return {"device": device_name(device), "cpu": cpu_model(), "cpu_flags": " ".join(cpu_flags()),
            "precision": precision.name, "precision_reason": precision.reason}


def announce(device: torch.device, precision: Precision) -> None:
    """The stage's first line (on stderr, beside tqdm's bars): where it computes, and in what."""
    print(f"device {device_name(device)} (CPU {cpu_summary()}); "
          f"precision {precision.name} ({precision.reason})", file=sys.stderr)
