"""The crash matrix: every stage of dvc.yaml, run as DVC runs it (its own command line, in a
workspace of generated data), is SIGKILLed at chosen points, then rerun; the rerun's outputs
must equal an uninterrupted run's byte for byte (timings aside) and no temporary file may
remain. Checkpointed stages resume; the others start over.

Kill points, per stage output written (each is one atomic directory or file):
- `early:N`: as the N-th output starts, before its temporary sibling exists;
- `rename:N`: the N-th output fully written to its temporary sibling, just before the rename.
A training stage writes a checkpoint per epoch, so `rename:2` kills it mid-run, between epochs.
The short form (CI) tries one point per stage; CRASH_MATRIX=full tries every
`early:1`..`early:3` and `rename:1`..`rename:3`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT
from tests.test_pipeline import shrink

pytestmark = pytest.mark.slow

# Imported first in the killed run: wraps the atomic writers so that the process SIGKILLs
# itself at the point CRASH_AT names, then runs the stage as `python -m` would.
HOOK = """
import contextlib, os, runpy, signal, sys
import stages.lib.outputs as outputs
point, at = os.environ["CRASH_AT"].split(":")
count = [0]

def wrap(original):
    @contextlib.contextmanager
    def crashing(dest):
        count[0] += 1
        this = count[0]  # outputs may nest: each knows its own number
        if this == int(at) and point == "early":
            os.kill(os.getpid(), signal.SIGKILL)
        with original(dest) as tmp:
            yield tmp
            if this == int(at) and point == "rename":
                os.kill(os.getpid(), signal.SIGKILL)
    return crashing

outputs.atomic_dir, outputs.atomic_file = wrap(outputs.atomic_dir), wrap(outputs.atomic_file)
module, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""
SHORT = {"download": ["rename:1"], "extract": ["rename:1"], "preprocess": ["early:2"],
         "train": ["rename:2"], "finetune": ["rename:1"], "export": ["rename:1"],
         "evaluate": ["rename:2"]}
FULL = [f"{point}:{n}" for point in ("early", "rename") for n in (1, 2, 3)]
OUTPUT_ROOTS = ("data", "models", "metrics", "plots", "dvclive", "checkpoints")


PIPELINE = ("download", "extract", "preprocess", "train", "finetune", "export", "evaluate")


def stage_commands() -> dict[str, list[str]]:
    """Each stage's command line from dvc.yaml, `${download.dataset}` filled in, in the order
    the pipeline runs them (dvc.yaml lists evaluate early, for its metrics' sake)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert sorted(stages) == sorted(PIPELINE)
    return {name: stages[name]["cmd"].replace("${download.dataset}", "cifar10").split()
            for name in PIPELINE}


def workspace(path: Path, tarball: tuple[Path, str]) -> Path:
    path.mkdir()
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["download"].update(url=tarball[0].as_uri(), md5=tarball[1])
    shrink(params)
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def run(cwd: Path, command: list[str], crash_at: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DVC_NO_ANALYTICS": "1"}
    python, module, args = sys.executable, command[2], command[3:]
    if crash_at is None:
        return subprocess.run([python, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True)
    return subprocess.run([python, "-c", HOOK, module, *args], cwd=cwd, capture_output=True, text=True,
                          env={**env, "CRASH_AT": crash_at})


def comparable(path: Path) -> bytes | object:
    """A file's bytes; for JSON its content without timings; for a torch.export archive its
    members but the random id torch writes into every save."""
    if path.suffix == ".json":
        return without_timings(json.loads(path.read_text()))
    if path.suffix == ".pt2":
        with zipfile.ZipFile(path) as archive:
            return {name: archive.read(name) for name in archive.namelist()
                    if not name.endswith("serialization_id") and "/sample_inputs/" not in name}
    return path.read_bytes()


def without_timings(value: object) -> object:
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items()
                if "seconds" not in k and "per_second" not in k}
    return [without_timings(v) for v in value] if isinstance(value, list) else value


def snapshot(cwd: Path) -> dict[str, object]:
    """Every output file, but DVCLive's curves of seconds (a resumed run has no timing for the
    epochs it replays, nor one at all when it resumes after its last epoch)."""
    return {str(p.relative_to(cwd)): comparable(p)
            for root in OUTPUT_ROOTS for p in sorted((cwd / root).rglob("*"))
            if p.is_file() and "seconds" not in p.name and "per_second" not in p.name}


def strays(cwd: Path) -> list[str]:
    return [str(p.relative_to(cwd)) for p in cwd.rglob("*.tmp")]


def test_each_stage_killed_at_each_point_reruns_to_the_uninterrupted_outputs(tmp_path: Path,
                                                                              tarball) -> None:
    commands = stage_commands()
    reference = workspace(tmp_path / "reference", tarball)
    killed = workspace(tmp_path / "killed", tarball)
    points = {name: FULL for name in commands} if os.environ.get("CRASH_MATRIX") == "full" else SHORT
    tried: dict[str, int] = {}
    for name, command in commands.items():
        assert run(reference, command).returncode == 0, name
        expected = snapshot(reference)
        tried[name] = 0
        for crash_at in points[name]:
            crashed = run(killed, command, crash_at)
            if crashed.returncode == 0:  # the stage writes fewer outputs than this point needs
                continue
            assert crashed.returncode == -9, f"{name} at {crash_at}: {crashed.stderr[-2000:]}"
            tried[name] += 1
            rerun = run(killed, command)
            assert rerun.returncode == 0, f"{name} after {crash_at}: {rerun.stderr[-2000:]}"
            assert snapshot(killed) == expected, f"{name} after {crash_at}"
            assert strays(killed) == [], f"{name} after {crash_at}"
        if tried[name] == 0:  # every point past the stage's outputs: run it plainly
            assert run(killed, command).returncode == 0
    print("crash matrix, kill points tried per stage:", tried)
    assert all(tried.values()), tried
