"""Benchmark: airbench94's own script (KellerJordan/cifar10-airbench, legacy/airbench94.py)
moved to this CPU and fed this project's split: the outside baseline of #13, beside which the
default's train stage (bench.time_to_accuracy) is read.

usage: python -m bench.airbench_script AIRBENCH94_PY [IMAGES_DIR] [--runs 1] [--dtype bfloat16]

The script is not part of this project: give the path of a copy. It runs patched, never
edited: each replacement below must match the copy, or the bench stops naming the one that
did not. Its data is this project's (train.pt from the training split, 45,000 images for
CIFAR-10, test.pt from the test split, as its CifarLoader reads them); its half precision
becomes `--dtype` (bfloat16 where the CPU computes it natively: weights and images in it,
BatchNorm in float32 as there); CUDA events become perf_counter. Prints each run's test
accuracy (its TTA) and its own timer: whitening, epochs and the final TTA pass, not the
per-epoch evaluation or the loading, as it times itself on a GPU.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from stages.data import decode_split, read_classes
from stages.devices import cpu_summary

TIMER = """import time
class _CpuEvent:  # torch.cuda.Event's record / elapsed_time on the CPU's clock
    def record(self): self.t = time.perf_counter()
    def elapsed_time(self, end): return 1e3 * (end.t - self.t)
"""
PATCHES = (  # (what the script has, what runs instead)
    ("map_location=torch.device(gpu)", "map_location='cpu'"),
    ("(self.images.half() / 255)", "(self.images.to(DTYPE) / 255)"),
    ("net = net.half().cuda()", "net = net.to(DTYPE)"),
    ("(torch.half, torch.float)", "(torch.half, torch.bfloat16, torch.float)"),  # its EMA's dtypes
    ("torch.cuda.Event(enable_timing=True)", "_CpuEvent()"),
    ("torch.cuda.synchronize()", "pass"),
    ("for run in range(25)", "for run in range(int(os.environ['AIRBENCH_RUNS']))"),
    ("import torch\n", "import torch\nDTYPE = getattr(torch, os.environ['AIRBENCH_DTYPE'])\n" + TIMER),
)
# its final row of a run: | run | eval | train_loss | train_acc | val_acc | tta_val_acc | seconds |
EVAL_ROW = re.compile(r"^\|[^|]*\|\s*eval\s*\|[^|]*\|[^|]*\|[^|]*\|\s*([\d.]+)\s*\|\s*([\d.]+)\s*\|$", re.M)


def patched(source: str, path: Path) -> str:
    for old, new in PATCHES:
        if old not in source:
            raise SystemExit(f"bench.airbench_script: {path} has no `{old.strip()}`; this bench "
                             "patches legacy/airbench94.py of KellerJordan/cifar10-airbench")
        source = source.replace(old, new)
    return source


def write_tensors(images_dir: Path, out: Path) -> None:
    """train.pt and test.pt as airbench's CifarLoader saves them: uint8 N x H x W x C."""
    classes = read_classes(images_dir)
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        images, labels = decode_split(images_dir / f"{split}.csv", images_dir, len(classes))
        torch.save({"images": images.permute(0, 2, 3, 1).contiguous(), "labels": labels,
                    "classes": classes}, out / f"{split}.pt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("script", type=Path)
    parser.add_argument("images_dir", nargs="?", type=Path, default=Path("data/images"))
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = parser.parse_args()
    source = patched(args.script.read_text(), args.script)
    print(f"CPU {cpu_summary()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.script} in {args.dtype}, {args.runs} run(s)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        write_tensors(args.images_dir, Path(tmp) / "cifar10")
        (Path(tmp) / "airbench94_cpu.py").write_text(source)
        env = {**os.environ, "AIRBENCH_RUNS": str(args.runs), "AIRBENCH_DTYPE": args.dtype}
        done = subprocess.run([sys.executable, "airbench94_cpu.py"], cwd=tmp, env=env,
                              capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"bench.airbench_script: {args.script}, patched, exited with "
                         f"{done.returncode}:\n{done.stderr[-4000:]}")
    rows = [(float(acc), float(seconds)) for acc, seconds in EVAL_ROW.findall(done.stdout)]
    if len(rows) != args.runs:
        raise SystemExit(f"bench.airbench_script: expected {args.runs} final rows, found "
                         f"{len(rows)} in its output:\n{done.stdout}")
    for run, (accuracy, seconds) in enumerate(rows):
        print(f"run {run}: test accuracy (TTA) {accuracy:.4f}, its timer {seconds:.0f} s")
    accuracies, times = zip(*rows)
    spread = statistics.stdev(accuracies) if len(rows) > 1 else 0.0
    print(f"airbench94 script: test accuracy {statistics.mean(accuracies):.4f} +- {spread:.4f}, "
          f"{statistics.mean(times):.0f} s by its timer")


if __name__ == "__main__":
    main()
