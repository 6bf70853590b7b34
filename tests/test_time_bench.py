"""bench.time_to_accuracy's table and recipes, and bench.flops' count (timings need the
machine itself: they are the bench's to print, not the tests' to assert)."""
import pytest
import torch

from bench import flops, time_to_accuracy
from bench.time_to_accuracy import Recipe, recipe_params, stage_params, table
from stages.lib.nets import build_model
from stages.lib.params import Params, TrainParams, build


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


def lenet(**changes: object) -> TrainParams:
    """The default recipe on LeNet (which cannot resize), 16-image batches, nothing cut."""
    plain = {"train.arch": "lenet", "train.batch_size": 16, "train.progressive_from": 0,
             "train.select_from": 0, "train.freeze_from": 0}
    return build(Params, recipe_params("default", {**plain, **changes}), "").train


def per_image(frozen_prefixes: tuple[str, ...] = ()) -> float:
    model = build_model("lenet", 10, (3, 32, 32)).train()
    for name, param in model.named_parameters():
        param.requires_grad_(not name.startswith(frozen_prefixes))
    images, labels = torch.zeros(4, 3, 32, 32), torch.zeros(4, dtype=torch.long)
    return flops.step_flops(model, images, labels, None) / 4


def test_a_recipe_counts_the_steps_its_loop_takes() -> None:
    # 64 images in batches of 16: 4 steps an epoch; a fractional last epoch stops early
    assert flops.recipe_flops(lenet(**{"train.epochs": 2.0}), examples=64) == 8 * 16 * per_image()
    assert flops.recipe_flops(lenet(**{"train.epochs": 1.5}), examples=64) == 6 * 16 * per_image()
    # selection from epoch 1 keeps the hardest half: 2 steps there
    selected = lenet(**{"train.epochs": 2.0, "train.select_from": 1, "train.select_fraction": 0.5})
    assert flops.recipe_flops(selected, examples=64) == (4 + 2) * 16 * per_image()


def test_a_recipe_counts_frozen_blocks_as_backward_skips_them() -> None:
    frozen = lenet(**{"train.epochs": 3.0, "train.freeze_from": 1, "train.freeze_blocks": 2})
    expected = 4 * 16 * (per_image() + per_image(("conv1.",)) + per_image(("conv1.", "conv2.")))
    assert flops.recipe_flops(frozen, examples=64) == expected
    assert per_image(("conv1.", "conv2.")) < per_image(("conv1.",)) < per_image()


def test_a_recipe_counts_smaller_images_as_fewer_flops() -> None:
    full = recipe_params("default", {"train.progressive_from": 0})
    resized = recipe_params("default", {})
    assert resized["train"]["progressive_from"] == 16
    full_flops = flops.recipe_flops(build(Params, full, "").train, examples=2048)
    resized_flops = flops.recipe_flops(build(Params, resized, "").train, examples=2048)
    # the first 60% of the epochs at 16-28 pixels instead of 32
    assert 0.6 * full_flops < resized_flops < 0.7 * full_flops


def test_the_default_recipe_counts_fewer_flops_than_the_baseline() -> None:
    totals = {name: flops.recipe_flops(build(Params, recipe_params(name, {}), "").train, examples=2048)
              for name in ("default", "airbench94")}
    assert 0.5 < totals["default"] / totals["airbench94"] < 0.9  # resizing, selection, freezing


def test_table_gives_mean_spread_and_time_ratio_to_the_baseline(monkeypatch) -> None:
    monkeypatch.setattr(time_to_accuracy, "step_throughput", lambda arch, batch, amp: 300e9)
    monkeypatch.setattr(time_to_accuracy, "recipe_flops",
                        lambda train, examples: 300e12 if train.epochs == 9.9 else 150e12)
    base = Recipe("airbench94", recipe_params("airbench94", {}), [0.90, 0.91, 0.92], [600, 610, 620], [500] * 3)
    new = Recipe("default", recipe_params("default", {}), [0.91, 0.91, 0.91], [300, 305, 310], [250] * 3)
    lines = table([base, new], peak=600e9, examples=45_000)
    assert lines[1].split() == ["airbench94", "0.9100", "+-", "0.0100", "610", "500", "1.00",
                                "300.0", "1.00", "300", "0.50"]
    assert lines[2].split() == ["default", "0.9100", "+-", "0.0000", "305", "250", "0.50",
                                "150.0", "0.50", "300", "0.50"]


def test_a_timed_run_scores_the_tta_level_its_stage_resolved(image_folder, capsys) -> None:
    params = recipe_params("default", {"train.epochs": 1.0, "train.batch_size": 30,
                                       "train.eval_batch_size": 50, "train.freeze_from": 0,
                                       "train.select_from": 0})
    assert params["train"]["tta"] == "auto"
    recipe = Recipe("default", params)
    time_to_accuracy.run(recipe, image_folder, seed=0)
    assert len(recipe.accuracies) == 1 and 0 <= recipe.accuracies[0] <= 1
    assert "seed 0: test accuracy (flip_shift) " in capsys.readouterr().out  # CIFAR-10: auto's level
