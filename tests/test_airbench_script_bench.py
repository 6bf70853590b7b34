"""bench.airbench_script: airbench94's script runs patched for the CPU on this project's split.
The real script is not here (no internet, not vendored); a stand-in carrying every line the
bench patches reads the tensors the bench wrote and prints airbench's final rows."""
import sys
from pathlib import Path

import pytest
import torch

from bench import airbench_script
from tests.folder_format import write_folder

STAND_IN = '''import os
import torch
gpu = 0

class CifarLoader:
    def __init__(self, split):
        data = torch.load(os.path.join('cifar10', split + '.pt'), map_location=torch.device(gpu))
        self.images, self.labels = data['images'], data['labels']
        self.images = (self.images.half() / 255)

def make_net():
    net = torch.nn.Linear(2, 2)
    net = net.half().cuda()
    return net

def main(run):
    train, test = CifarLoader('train'), CifarLoader('test')
    net = make_net()
    assert train.images.dtype == net.weight.dtype == torch.bfloat16
    assert net.weight.dtype in (torch.half, torch.float)
    assert tuple(train.images.shape[1:]) == (32, 32, 3)
    starter, ender = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    starter.record()
    ender.record()
    torch.cuda.synchronize()
    seconds = 1e-3 * starter.elapsed_time(ender) + 60 * (run + 1)
    share = (test.labels == 0).float().mean().item()
    print('|  %s  |  eval  |  1.0000  |  0.5000  |  0.4000  |  %.4f  |  %.4f  |' % (run, share, seconds))

if __name__ == "__main__":
    accs = [main(run) for run in range(25)]
'''


def test_runs_the_patched_script_on_the_projects_split(tmp_path, monkeypatch, capsys) -> None:
    folder = write_folder(tmp_path / "images", 3, 32, 4, {"train": 3, "val": 1, "test": 2})
    script = tmp_path / "airbench94.py"
    script.write_text(STAND_IN)
    monkeypatch.setattr(sys, "argv", ["airbench_script", str(script), str(folder), "--runs", "2"])
    airbench_script.main()
    out = capsys.readouterr().out
    assert "run 0: test accuracy (TTA) 0.2500, its timer 60 s" in out  # 2 of 8 test images are class 0
    assert "run 1: test accuracy (TTA) 0.2500, its timer 120 s" in out
    assert "airbench94 script: test accuracy 0.2500 +- 0.0000, 90 s by its timer" in out


def test_tensors_are_airbenchs_layout(tmp_path) -> None:
    folder = write_folder(tmp_path / "images", 3, 32, 4, {"train": 3, "test": 2})
    airbench_script.write_tensors(folder, tmp_path / "out")
    train = torch.load(tmp_path / "out" / "train.pt")
    assert train["images"].shape == (12, 32, 32, 3) and train["images"].dtype == torch.uint8
    assert train["labels"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert train["classes"] == [f"class_{i:02d}" for i in range(4)]


def test_a_script_missing_a_patched_line_is_refused_by_name(tmp_path) -> None:
    path = Path("airbench94.py")
    with pytest.raises(SystemExit, match=r"airbench94.py has no `torch.cuda.synchronize\(\)`"):
        airbench_script.patched(STAND_IN.replace("torch.cuda.synchronize()", ""), path)


def test_a_failing_script_is_reported_with_its_error(tmp_path, monkeypatch) -> None:
    folder = write_folder(tmp_path / "images", 3, 32, 2, {"train": 1, "test": 1})
    script = tmp_path / "airbench94.py"
    script.write_text(STAND_IN.replace("net = make_net()", "net = make_net(); raise RuntimeError('out of luck')"))
    monkeypatch.setattr(sys, "argv", ["airbench_script", str(script), str(folder)])
    with pytest.raises(SystemExit, match=r"(?s)exited with 1:.*RuntimeError: out of luck"):
        airbench_script.main()
