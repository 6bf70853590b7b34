import subprocess
import sys
from pathlib import Path

import torch
from PIL import Image

from stages.export import export
from stages.lib.card import save_model
from stages.lib.nets import build_model
from stages.predict import top_k
from tests.cifar_format import CLASSES
from tests.conftest import model_card

STATS = {"mean": [0.5, 0.4, 0.3], "std": [0.25, 0.2, 0.3]}


def saved_model(tmp_path: Path, arch: str = "airbench") -> Path:
    torch.manual_seed(0)
    model = build_model(arch, 10, (3, 32, 32)).eval()
    with torch.no_grad():  # non-trivial BN statistics, so eval mode matters
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    save_model(model, tmp_path / "model", model_card(arch, CLASSES, STATS))
    return tmp_path / "model"


def test_predict_prints_top_k_for_images_of_any_size(tmp_path: Path) -> None:
    model_dir = saved_model(tmp_path)
    paths = []
    for i, size in enumerate([(32, 32), (64, 48), (17, 90)]):
        paths.append(tmp_path / f"img{i}.png")
        Image.new("RGB", size, (40 * i, 100, 200)).save(paths[-1])
    results = top_k(model_dir, paths, 3)
    assert len(results) == 3 and all(len(r) == 3 for r in results)
    for row in results:
        assert all(name in CLASSES for name, _ in row)
        assert [p for _, p in row] == sorted((p for _, p in row), reverse=True)
        assert 0 < sum(p for _, p in row) <= 1 + 1e-6
    for model in (model_dir, model_dir / "model.pt"):  # the folder, or the model.pt inside it
        cli = subprocess.run([sys.executable, "-m", "stages.predict", str(model), str(paths[0]),
                              "--top-k", "2"], capture_output=True, text=True, check=True)
        assert cli.stdout.startswith(f"{paths[0]}: {results[0][0][0]} ")


def test_exported_program_equals_the_eager_model_without_project_code(tmp_path: Path) -> None:
    model_dir = saved_model(tmp_path)
    export(model_dir, tmp_path / "export")
    images = torch.rand(5, 3, 32, 32)
    from stages.lib.card import load_trained
    eager, _ = load_trained(model_dir)
    mean, std = torch.tensor(STATS["mean"]).view(1, 3, 1, 1), torch.tensor(STATS["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = eager((images - mean) / std)
    torch.save(images, tmp_path / "images.pt")
    # A fresh interpreter in which importing this project fails: only torch and the artifact.
    script = ("import sys, torch; sys.modules['stages'] = None\n"
              f"program = torch.export.load({str(tmp_path / 'export' / 'model.pt2')!r})\n"
              f"images = torch.load({str(tmp_path / 'images.pt')!r}, weights_only=True)\n"
              f"torch.save(program.module()(images), {str(tmp_path / 'out.pt')!r})\n")
    subprocess.run([sys.executable, "-I", "-c", script], cwd=tmp_path, check=True)
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    assert got.shape == (5, 10)
    assert torch.allclose(got, expected, atol=1e-5)
