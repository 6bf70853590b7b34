"""bench.time_to_accuracy's table and recipes, and bench.flops' count (timings need the
machine itself: they are the bench's to print, not the tests' to assert)."""
import pytest
import torch

from bench import flops, time_to_accuracy
from bench.time_to_accuracy import Recipe, recipe_params, stage_params, table


def test_a_step_counts_forward_and_weight_gradient_matmuls() -> None:
    model = torch.nn.Linear(4, 3, bias=False)
    images, labels = torch.randn(5, 4), torch.randint(0, 3, (5,))
    # forward 2*5*4*3, and the weight's gradient as much again (the input needs none)
    assert flops.step_flops(model, images, labels, None) == 2 * 120


def test_recipes_are_the_preset_and_the_default_with_changes() -> None:
    baseline = recipe_params("airbench94", {})
    assert baseline["train"]["optimizer"] == "sgd" and baseline["train"]["epochs"] == 9.9
    changed = recipe_params("default", {"train.epochs": 2.0})
    assert changed["train"]["epochs"] == 2.0
    with pytest.raises(Exception, match="train.epochs must be a number > 0"):
        recipe_params("default", {"train.epochs": 0})


def test_every_timed_run_validates_once_whatever_its_recipe_says() -> None:
    baseline = recipe_params("airbench94", {})
    assert baseline["train"]["eval_every"] == 1  # the preset's own monitoring
    run = stage_params(baseline, seed=3)
    assert run["train"]["seed"] == 3 and run["train"]["eval_every"] == 0
    assert {k: v for k, v in run["train"].items() if k not in ("seed", "eval_every")} == \
        {k: v for k, v in baseline["train"].items() if k not in ("seed", "eval_every")}
    assert baseline["train"]["eval_every"] == 1  # the recipe itself is left as it was


def test_table_gives_mean_spread_and_time_ratio_to_the_baseline(monkeypatch) -> None:
    monkeypatch.setattr(time_to_accuracy, "step_throughput", lambda arch, batch, amp: 300e9)
    base = Recipe("airbench94", recipe_params("airbench94", {}), [0.90, 0.91, 0.92], [600, 610, 620], [500] * 3)
    new = Recipe("default", recipe_params("default", {}), [0.91, 0.91, 0.91], [300, 305, 310], [250] * 3)
    lines = table([base, new], peak=600e9)
    assert lines[1].split() == ["airbench94", "0.9100", "+-", "0.0100", "610", "500", "1.00", "300", "0.50"]
    assert lines[2].split() == ["default", "0.9100", "+-", "0.0000", "305", "250", "0.50", "300", "0.50"]
