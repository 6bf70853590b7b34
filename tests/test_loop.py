import dataclasses
import math

import pytest
import torch

from stages.data import BatchLoader
from stages.devices import pick_device
from stages.loop import (TTA_WEIGHTS, Training, WeightAverage, lr_factor, param_groups,
                         predict_levels, predict_logits, tta_views)
from stages.model import AirbenchNet, build_model
from stages.outputs import StageError
from stages.params import load_params
from tests.conftest import ROOT


def train_params(**changes):
    return dataclasses.replace(load_params(ROOT / "params.yaml").train, **changes)


def test_explicit_absent_device_is_an_error_not_a_fallback() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(StageError, match="device 'cuda' is not available"):
        pick_device("cuda")
    assert pick_device("auto").type in ("cuda", "mps", "cpu")


def test_loader_crops_are_exact_windows_of_the_padded_images_at_varied_offsets() -> None:
    n = 40
    images = torch.arange(n * 2 * 8 * 8, dtype=torch.float32).view(n, 2, 8, 8)
    loader = BatchLoader(images, torch.arange(n), 16, crop_padding=2, flip=False, shuffle=True,
                         drop_last=False, seed=0)
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2), mode="reflect")
    offsets = set()
    for batch, labels in loader:
        assert batch.shape == (len(labels), 2, 8, 8)
        for crop, i in zip(batch, labels.tolist()):
            found = [(y, x) for y in range(5) for x in range(5)
                     if torch.equal(crop, padded[i, :, y:y + 8, x:x + 8])]
            assert len(found) == 1
            offsets.add(found[0])
    assert len(offsets) > 10  # offsets vary per image, not one per batch


def test_loader_yields_every_image_once_per_epoch_with_alternating_flips() -> None:
    n = 10
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1) * torch.ones(n, 1, 2, 3)
    images[:, :, :, 0] = -1  # a marker column shows whether an image is mirrored
    labels = torch.arange(n)
    loader = BatchLoader(images, labels, 4, crop_padding=0, flip=True, shuffle=True,
                         drop_last=False, seed=0)
    first, second = [list(loader) for _ in range(2)]
    for epoch in (first, second):
        seen = torch.cat([y for _, y in epoch])
        assert sorted(seen.tolist()) == list(range(n))
        for x, y in epoch:
            assert torch.equal(x[:, 0, 0, 1], y.float())  # image travels with its label
    mirrored = {epoch_index: {int(y): bool(x[0, 0, 0] != -1) for xb, yb in epoch for x, y in zip(xb, yb)}
                for epoch_index, epoch in enumerate((first, second))}
    assert all(mirrored[0][i] != mirrored[1][i] for i in range(n))


def test_lr_schedules_start_peak_and_end_where_stated() -> None:
    assert lr_factor("triangle", 0, 100, 0.25) == pytest.approx(0.2)
    assert lr_factor("triangle", 25, 100, 0.25) == pytest.approx(1.0)
    assert lr_factor("triangle", 100, 100, 0.25) == pytest.approx(0.07)
    assert lr_factor("cosine", 0, 100, 0.1) == 0 and lr_factor("cosine", 10, 100, 0.1) == pytest.approx(1)
    assert lr_factor("cosine", 100, 100, 0.1) == pytest.approx(0, abs=1e-12)
    assert lr_factor("constant", 50, 100, 0.1) == 1


def test_param_groups_give_frozen_scale_norm_biases_the_higher_lr() -> None:
    model = AirbenchNet(10)
    groups = {g.name: g for g in param_groups(model, model.HEAD, 0.1, 0.5, 0.01, 64.0,
                                               freeze_epochs=1, whiten_bias_epochs=3)}
    assert groups["head"].lr == 0.5 and groups["head"].trains_in(0)
    assert groups["norm_bias"].lr == pytest.approx(6.4)
    assert groups["norm_bias"].lr * groups["norm_bias"].weight_decay == pytest.approx(0.1 * 0.01)
    assert not groups["backbone"].trains_in(0) and groups["backbone"].trains_in(1)
    assert groups["whiten_bias"].trains_in(2) and not groups["whiten_bias"].trains_in(3)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for g in groups.values() for p in g.params}


def test_weight_average_moves_towards_the_model_and_copies_back() -> None:
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    average = WeightAverage(model)
    with torch.no_grad():
        model.weight.fill_(1.0)
    average.update(model, decay=0.75)
    assert torch.allclose(model.weight, torch.full((1, 2), 0.25))


def test_tta_views_have_the_input_shape_and_weights_summing_to_one() -> None:
    images = torch.randn(3, 3, 8, 8)
    for level, weights in TTA_WEIGHTS.items():
        views = tta_views(images, len(weights))
        assert len(views) == len(weights) and sum(weights) == pytest.approx(1.0)
        assert all(v.shape == images.shape for v in views)
    plain, mirror, up_left, _, down_right, _ = tta_views(images, 6)
    assert torch.equal(plain, images) and torch.equal(mirror, images.flip(-1))
    assert torch.equal(up_left[..., 1:, 1:], images[..., :-1, :-1])
    assert torch.equal(down_right[..., :-1, :-1], images[..., 1:, 1:])


def test_shared_tta_pass_equals_separate_passes() -> None:
    model = build_model("lenet", 4)
    images = torch.randn(15, 3, 32, 32)
    levels = predict_levels(model, images, 4, list(TTA_WEIGHTS), amp=False)
    for level in TTA_WEIGHTS:
        assert levels[level].shape == (15, 4) and levels[level].dtype == torch.float32
        assert torch.allclose(levels[level], predict_logits(model, images, 7, level, amp=False), atol=1e-5)
    views = [model.eval()(v) for v in tta_views(images, 2)]
    assert torch.allclose(levels["flip"], (views[0] + views[1]) / 2, atol=1e-5)


def toy_data(n: int = 200, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes told apart by the sign of the mean red value."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=generator)
    images = torch.randn(n, 3, 32, 32, generator=generator)
    images[:, 0] += (labels.float() * 2 - 1).view(-1, 1, 1)
    return images, labels


def make_training(seed: int = 0, **changes) -> Training:
    params = train_params(**{"arch": "lenet", "optimizer": "adam", "lr": 0.003, "epochs": 3.0,
                             "batch_size": 50, "amp": False, "ema_every": 2, **changes})
    torch.manual_seed(seed)
    model = build_model("lenet", 2)
    images, labels = toy_data()
    loader = BatchLoader(images, labels, params.batch_size, crop_padding=2, flip=True, shuffle=True,
                         drop_last=True, seed=seed)
    groups = param_groups(model, model.HEAD, params.lr, params.lr, 0.0, 1.0, 0, 0)
    return Training(model, groups, params, loader, torch.device("cpu"))


def test_training_learns_a_separable_toy_task() -> None:
    training = make_training()
    losses = []
    for _ in range(3):
        losses.append(training.run_epoch()["loss"])
        training.epoch += 1
    assert training.step == math.ceil(4 * 3.0)
    assert losses[-1] < losses[0]
    images, labels = toy_data(seed=1)
    accuracy = (predict_logits(training.model, images, 100, "none", False).argmax(1) == labels)
    assert accuracy.float().mean() > 0.9


def test_non_finite_loss_stops_with_epoch_and_step() -> None:
    training = make_training(lr=1e30, optimizer="sgd", momentum=0.0, nesterov=False)
    with pytest.raises(StageError, match=r"non-finite loss at epoch \d+, step \d+"):
        for _ in range(3):
            training.run_epoch()
            training.epoch += 1
