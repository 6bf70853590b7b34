"""Every stage answers --help with its usage and exits 0, touching nothing."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT

STAGES = ("download", "extract", "preprocess", "train", "finetune", "export", "evaluate", "predict")


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_prints_its_usage_on_help(stage: str, tmp_path) -> None:
    result = subprocess.run([sys.executable, "-m", f"stages.{stage}", "--help"], cwd=tmp_path,
                            env={"PYTHONPATH": str(ROOT), "PATH": ""}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"usage: python -m stages.{stage}" in result.stdout
    assert list(tmp_path.iterdir()) == []  # no params.yaml needed, no folder named --help
