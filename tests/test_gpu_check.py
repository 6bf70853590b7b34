"""bench.gpu_check's CPU-runnable parts: arguments, the refusal without CUDA (and without dvc),
the table, and the checks that need no CUDA-only API, run here on the CPU."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from bench.gpu_check import Run, check_loader, check_resume, parse_args, summary
from tests.conftest import ROOT
from tests.test_loop import toy_data, train_params

# What the GPU machines lack; the check must import and read its params without any of them.
ABSENT = ("dvclive", "dvc", "pandas")


def test_arguments_default_and_refuse_nonsense(capsys) -> None:
    args = parse_args([])
    assert (args.images_dir, args.seeds, args.steps) == (Path("data/images"), 5, 20)
    assert parse_args(["x", "--seeds", "3"]).seeds == 3
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--seeds", "0"])
    assert exit_info.value.code == 2 and "--seeds and --steps must be >= 1" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_refuses_without_cuda_and_needs_no_dvc(tmp_path: Path) -> None:
    blocked = "; ".join(f"sys.modules[{name!r}] = None" for name in ABSENT)
    code = f"import sys; {blocked}; import bench.gpu_check as g; sys.exit(g.main([]))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines() == [
        f"bench.gpu_check: needs a CUDA GPU; torch {torch.__version__} (CUDA {torch.version.cuda}) "
        "sees none. Run it on a GPU machine."]


def test_summary_gives_mean_and_spread_per_split() -> None:
    def run(split: str, seed: int, acc: float, seconds: float) -> Run:
        return Run(split, seed, {"none": acc - 0.01, "flip": acc - 0.005, "flip_shift": acc},
                   seconds, seconds + 2, 1.5)
    lines = summary([run("default", 0, 0.93, 4.0), run("default", 1, 0.95, 6.0),
                     run("all 50,000", 0, 0.94, 5.0)])
    assert lines == [
        "default, mean of 2: test none 0.9300+-0.0141, test flip 0.9350+-0.0141, test flip_shift "
        "0.9400+-0.0141, train_seconds 5.0000+-1.4142, wall_seconds 7.0000+-1.4142, peak_gib 1.5000+-0.0000",
        "all 50,000, mean of 1: test none 0.9300+-0.0000, test flip 0.9350+-0.0000, test flip_shift "
        "0.9400+-0.0000, train_seconds 5.0000+-0.0000, wall_seconds 7.0000+-0.0000, peak_gib 1.5000+-0.0000"]


def test_loader_and_resume_checks_pass_on_the_cpu(tmp_path: Path, capsys) -> None:
    params = dataclasses.replace(train_params(), arch="airbench", batch_size=32, amp=False,
                                 eval_batch_size=50)
    images, labels = toy_data(96)
    assert check_loader(params, images, labels, torch.device("cpu"))
    assert check_resume(params, images, labels, tmp_path)
    out = capsys.readouterr().out
    assert "[ok] loader: 6 batches of 2 epochs identical" in out
    assert "[ok] resume: epochs replayed [0, 1, 2], steps 9/9, loader draws identical" in out


@pytest.mark.slow
def test_the_whole_check_runs_through_on_the_cpu_with_cuda_faked(image_folder: Path, tmp_path: Path,
                                                                 monkeypatch, capsys) -> None:
    """Every step of main(), with the few CUDA-only calls stood in for: the flow, the checks'
    verdicts and the tables, on the tiny folder (the GPU's figures need the GPU)."""
    from bench import gpu_check
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"].update({"epochs": 4.0, "batch_size": 32, "eval_batch_size": 50})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "short.yaml").write_text("train:\n  epochs: 2.0  # a recipe of its own\n")
    monkeypatch.chdir(tmp_path)
    modes = []
    monkeypatch.setattr(gpu_check, "require_cuda", lambda: None)
    monkeypatch.setattr(gpu_check, "pick_device", lambda name: torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: type(
        "Props", (), {"name": "Fake GPU", "total_memory": 2 ** 34, "major": 9, "minor": 0}))
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 91000)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 2 ** 30)
    assert gpu_check.main([str(image_folder), "--packed", str(image_folder), "--seeds", "2", "--steps", "1",
                           "--recipes", "default", "short"]) == 0
    out = capsys.readouterr().out
    assert modes[0] == "error" and modes[-1] == "default"  # the steps ran strict, then reset
    for name in ("loader", "host syncs", "resume", "compile"):
        assert f"[ok] {name}: " in out
    assert "1 graph(s) over 4 epochs" in out
    assert "the stages compute in " in out
    table = [line for line in out.splitlines() if ", mean of 2: test none " in line]
    assert [line.split(", mean")[0] for line in table] == [
        "default, default (train split)", "default, all 50,000 (val 0)",
        "short, default (train split)", "short, all 50,000 (val 0)"]
    runs = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert {r["split"].split(",")[0] for r in runs} == {"default", "short"}
