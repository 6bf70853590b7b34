"""Device and precision choice: what each kind of machine gets, decided from the hardware alone."""
from __future__ import annotations

import platform
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stages.lib import clock, devices
from stages.lib.clock import Stopwatch
from stages.lib.devices import announce, hardware, pick_device, pick_precision

ROOT = Path(__file__).resolve().parents[1]

CPU = torch.device("cpu")


@pytest.mark.parametrize("flags, dtype", [
    (["AVX2"], None),                                      # AMD EPYC / most laptops: bf16 emulated
    (["AVX2", "AVX512"], None),                            # AVX-512 without bf16 (Skylake-SP)
    (["AVX2", "AVX512", "AVX512_BF16"], torch.bfloat16),   # Cooper Lake, Zen 4/5
    (["AVX2", "AVX512", "AVX512_BF16", "AMX"], torch.bfloat16),  # Sapphire Rapids
    ([], None),                                            # e.g. an ARM CPU
])
def test_auto_takes_bf16_only_on_cpus_that_compute_it_natively(monkeypatch, flags, dtype) -> None:
    monkeypatch.setattr(devices, "cpu_flags", lambda: flags)
    precision = pick_precision(CPU, "auto")
    assert precision.dtype is dtype
    assert precision.name == ("float32" if dtype is None else "bfloat16")
    assert precision.reason.startswith("amp auto: ")


def test_true_and_false_force_autocast_whatever_the_cpu(monkeypatch) -> None:
    monkeypatch.setattr(devices, "cpu_flags", lambda: ["AVX2"])
    assert pick_precision(CPU, True).dtype is torch.bfloat16
    monkeypatch.setattr(devices, "cpu_flags", lambda: ["AVX2", "AVX512", "AVX512_BF16", "AMX"])
    assert pick_precision(CPU, False).dtype is None
    assert pick_precision(torch.device("mps"), True).dtype is torch.float16


@pytest.mark.parametrize("native, dtype", [(True, torch.bfloat16), (False, None)])
def test_auto_on_cuda_follows_the_gpus_bf16_support(monkeypatch, native, dtype) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA Test GPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True:
                        native or including_emulation)
    precision = pick_precision(torch.device("cuda"), "auto")
    assert precision.dtype is dtype and "NVIDIA Test GPU" in precision.reason
    assert pick_precision(torch.device("mps"), "auto").dtype is torch.float16


def test_auto_says_so_when_a_cuda_build_finds_no_gpu(monkeypatch, capsys) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    assert pick_device("auto") == CPU
    err = capsys.readouterr().err
    assert "built for CUDA 12.8, but no GPU can be used" in err and "running on the CPU" in err
    monkeypatch.setattr(torch.version, "cuda", None)  # a CPU-only build: nothing to explain
    assert pick_device("auto") == CPU
    assert capsys.readouterr().err == ""


def test_announce_names_device_cpu_flags_and_precision(monkeypatch, capsys) -> None:
    monkeypatch.setattr(devices, "cpu_flags", lambda: ["AVX2"])
    monkeypatch.setattr(devices, "cpu_model", lambda: "AMD EPYC 7B13")
    precision = pick_precision(CPU, "auto")
    announce(CPU, precision)
    assert capsys.readouterr().err == (
        "device cpu (CPU AMD EPYC 7B13: AVX2); precision float32 (amp auto: the CPU has neither "
        "AMX nor AVX512_BF16, so bf16 would be emulated)\n")
    assert hardware(CPU, precision) == {
        "device": "cpu", "cpu": "AMD EPYC 7B13", "cpu_flags": "AVX2", "precision": "float32",
        "precision_reason": precision.reason}


def test_the_real_cpu_flags_are_named_as_torch_detects_them() -> None:
    flags = devices.cpu_flags()
    assert set(flags) <= {"AVX2", "AVX512", "AVX512_BF16", "AMX"}
    assert ("AVX512_BF16" in flags) == torch.cpu._is_avx512_bf16_supported()


def test_stopwatch_counts_only_its_sections(monkeypatch) -> None:
    readings = iter(range(0, 1000, 10))  # each reading of the host clock is 10 s later
    monkeypatch.setattr(clock.time, "perf_counter", lambda: next(readings))
    watch = Stopwatch(CPU)   # started at 0
    with watch.section():    # 10 -> 20
        pass
    watch.carried = 5.0      # seconds of a run before a resume
    with watch.section():    # 30 -> 40
        pass
    assert watch.seconds() == 25.0
    assert watch.wall_seconds() == 50.0


# A 64 MiB block is past glibc's largest mmap threshold (32 MiB): by default it is mapped
# afresh, and page-faulted through, every time; kept, a later step finds its pages there (the
# fewest faults of a few steps: between them Python's small objects may take the freed space).
REALLOCATE = """
import resource, sys, torch
from stages.lib.devices import pick_device
if sys.argv[1] == "cpu":
    pick_device("cpu")
faults = []
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(16 * 2 ** 20).fill_(1.0)  # 64 MiB of float32, freed at once
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(min(faults))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_the_cpu_device_keeps_freed_memory_for_the_next_step() -> None:
    def page_faults(device: str) -> int:
        out = subprocess.run([sys.executable, "-c", REALLOCATE, device], check=True,
                             capture_output=True, text=True, cwd=ROOT).stdout
        return int(out)

    pages = 64 * 2 ** 20 // resource.getpagesize()
    assert page_faults("none") > pages // 2  # the default maps the block anew
    assert page_faults("cpu") < pages // 100  # kept: its pages are already there
