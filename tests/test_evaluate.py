import csv
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from stages.evaluate import confusion_matrix, evaluate, macro_f1
from stages.lib.card import save_model
from stages.lib.nets import build_model
from stages.lib.params import EvaluateParams
from tests.cifar_format import CLASSES
from tests.conftest import model_card


def test_confusion_matrix_and_macro_f1_match_a_hand_count() -> None:
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    predictions = torch.tensor([0, 1, 1, 1, 0, 2])
    confusion = confusion_matrix(labels, predictions, 3)
    assert confusion.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    # class F1: 0 -> 2*1/(2+1+1) = 0.5; 1 -> 2*2/(4+1) = 0.8; 2 -> 2*1/(2+1) = 2/3
    assert macro_f1(confusion) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)


def test_evaluate_writes_metrics_and_plots_per_model(image_folder: Path, tmp_path: Path) -> None:
    stats = json.loads((image_folder / "normalization.json").read_text())
    for name, arch, tta in (("train", "lenet", "none"), ("finetune", "airbench", "flip_shift")):
        save_model(build_model(arch, 10, (3, 32, 32)), tmp_path / "models" / name,
                   model_card(arch, CLASSES, stats, tta=tta))
    evaluate(image_folder, tmp_path / "metrics", tmp_path / "plots",
             [tmp_path / "models" / "train", tmp_path / "models" / "finetune"],
             EvaluateParams(batch_size=7, device="cpu", amp=False, misclassified=5))
    for name in ("train", "finetune"):
        metrics = json.loads((tmp_path / "metrics" / f"{name}.json").read_text())
        with open(tmp_path / "plots" / name / "per_class.csv") as f:
            per_class = {row["class"]: float(row["accuracy"]) for row in csv.DictReader(f)}
        assert list(per_class) == CLASSES
        assert metrics["accuracy"] == pytest.approx(sum(per_class.values()) / 10, abs=1e-4)  # 2 per class
        assert not any(key.startswith("accuracy_") and key[9:] in CLASSES for key in metrics)
        # test-time augmentation only as far as the model's training validated with it
        tta = ["accuracy_tta_flip", "accuracy_tta_flip_shift"] if name == "finetune" else []
        assert set(metrics) == {"accuracy", "loss", "macro_f1", *tta}
        assert all(isinstance(v, (int, float)) for v in metrics.values())  # numbers that compare
        with open(tmp_path / "plots" / name / "confusion.csv") as f:
            rows = list(csv.DictReader(f))
        # every (actual, predicted) pair, zeros included: every class stays on both axes
        assert [(r["actual"], r["predicted"]) for r in rows] == [(a, p) for a in CLASSES for p in CLASSES]
        counts = {(r["actual"], r["predicted"]): int(r["count"]) for r in rows}
        assert sum(counts.values()) == 20
        assert all(counts[c, c] == round(2 * per_class[c]) for c in CLASSES)
        grid = Image.open(tmp_path / "plots" / name / "misclassified.png")
        assert grid.width == 8 * 96 and grid.height == 96 + 14
    machine = json.loads((tmp_path / "plots" / "machine.json").read_text())
    assert machine["device"] == "cpu" and machine["precision"] == "float32"
