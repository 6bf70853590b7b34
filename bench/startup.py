"""Time a one-epoch MNIST `dvc exp run` spends outside the training and evaluation loops.

usage: python -m bench.startup [MNIST_DIR]   (default: ../shared/data/mnist, the four .gz files)

In a scratch git + DVC repository holding the project's pipeline: first the whole pipeline on
MNIST with one epoch of train and finetune (the cold run: download to evaluate), then an
experiment that changes only the training seed (the warm run: the data stages are cached, as
in any `dvc exp run -S train...` sweep). For each it prints every stage's wall time from DVC's
own output, the loops' seconds (metrics' train_seconds; evaluate's scoring), and the rest:
process start-up, imports, reading the data, DVC's hashing and caching.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from stages.lib.devices import cpu_summary

ROOT = Path(__file__).resolve().parents[1]
STAGE = re.compile(r"Running stage '(\w+)'")
SCORED = re.compile(r"scored in ([\d.]+) s")


def scratch_repo(repo: Path, mnist: Path) -> None:
    for name in ("stages", "dvc.yaml", "params.yaml"):
        source = ROOT / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, repo / name)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    md5 = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(mnist.glob("*-ubyte.gz"))}
    params["download"].update(dataset="mnist", url=mnist.resolve().as_uri() + "/", md5=md5)
    params["train"].update(epochs=1.0)
    params["finetune"].update(epochs=0.2, freeze_epochs=0)  # its loop's length is not measured
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for command in (["git", "init", "-q"], ["git", "config", "user.email", "bench@example.com"],
                    ["git", "config", "user.name", "bench"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(command, cwd=repo, check=True)
    shutil.copy(ROOT / ".dvc" / "config", repo / ".dvc" / "config")
    shutil.copytree(ROOT / ".dvc" / "plots", repo / ".dvc" / "plots")
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "commit", "-qm", "bench"], cwd=repo, check=True)


def timed_run(repo: Path, *args: str) -> tuple[float, dict[str, float], float]:
    """(total seconds, each stage's seconds, evaluate's scoring seconds) of one dvc command."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PYTHONUNBUFFERED": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    start = time.perf_counter()
    stages: dict[str, float] = {}
    current, since, scored = None, start, 0.0
    process = subprocess.Popen([sys.executable, "-m", "dvc", *args], cwd=repo, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = []
    for line in process.stdout:
        output.append(line)
        now = time.perf_counter()
        if match := STAGE.search(line):
            if current:
                stages[current] = now - since
            current, since = match.group(1), now
        if match := SCORED.search(line):
            scored += float(match.group(1))
    if process.wait() != 0:
        raise SystemExit("".join(output[-30:]) + f"dvc {' '.join(args)} failed in {repo}")
    end = time.perf_counter()
    if current:
        stages[current] = end - since
    return end - start, stages, scored


def report(name: str, repo: Path, total: float, stages: dict[str, float], scored: float) -> None:
    loops = {stage: json.loads((repo / "metrics" / f"{stage}.json").read_text())["train_seconds"]
             for stage in ("train", "finetune") if stage in stages}
    if "evaluate" in stages:
        loops["evaluate"] = scored
    outside = total - sum(loops.values())
    print(f"\n{name}: {total:.1f} s in all, {outside:.1f} s outside the loops ({cpu_summary()})")
    for stage, seconds in stages.items():
        loop = loops.get(stage, 0.0)
        print(f"  {stage:10s} {seconds:6.1f} s   loop {loop:5.1f} s   outside {seconds - loop:5.1f} s")
    print(f"  {'(dvc)':10s} {total - sum(stages.values()):6.1f} s   before the first stage")


def main() -> None:
    mnist = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT.parent / "shared" / "data" / "mnist"
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp)
        scratch_repo(repo, mnist)
        report("cold: dvc exp run, download to evaluate", repo, *timed_run(repo, "exp", "run"))
        report("warm: dvc exp run -S train.seed=1 (data cached)", repo,
               *timed_run(repo, "exp", "run", "-S", "train.seed=1"))


if __name__ == "__main__":
    main()
