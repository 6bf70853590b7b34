import dataclasses
import math

import pytest
import torch

from stages.lib import clock, devices, loop
from stages.lib.card import load_weights
from stages.lib.data import BatchLoader, Sampling
from stages.lib.devices import pick_device, pick_precision
from stages.lib.inference import TTA_WEIGHTS, predict_levels, predict_logits, tta_views
from stages.lib.loop import (Checkpoint, Env, Training, final_levels, fit, progressive_size,
                             rng_tensor, start_groups, train_one_epoch, training_loader, warm_up)
from stages.lib.nets import AirbenchNet, build_model
from stages.lib.optim import (Muon, Rates, WeightAverage, lr_factor, orthogonalize, param_groups,
                              scratch_groups)
from stages.lib.outputs import StageError
from stages.lib.params import load_params
from tests.conftest import ROOT

CPU = torch.device("cpu")


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
    loader = BatchLoader(images, torch.arange(n), 16,
        Sampling(crop_padding=2, flip=False, shuffle=True, drop_last=False, seed=0))
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
    loader = BatchLoader(images, labels, 4,
        Sampling(crop_padding=0, flip=True, shuffle=True, drop_last=False, seed=0))
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
    model = AirbenchNet(10, 3, 32, 32)
    rates = Rates(0.1, 0.5, 0.01, 64.0, freeze_epochs=1, whiten_bias_epochs=3)
    groups = {g.name: g for g in param_groups(model, rates)}
    assert groups["head"].lr == 0.5 and groups["head"].trains_in(0)
    assert groups["norm_bias"].lr == pytest.approx(6.4)
    assert groups["norm_bias"].lr * groups["norm_bias"].weight_decay == pytest.approx(0.1 * 0.01)
    assert not groups["backbone"].trains_in(0) and groups["backbone"].trains_in(1)
    assert groups["stem_bias"].trains_in(2) and not groups["stem_bias"].trains_in(3)
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
    model = build_model("lenet", 4, (3, 32, 32))
    images = torch.randn(15, 3, 32, 32)
    levels = predict_levels(model, images, 4, list(TTA_WEIGHTS), dtype=None)
    for level in TTA_WEIGHTS:
        assert levels[level].shape == (15, 4) and levels[level].dtype == torch.float32
        assert torch.allclose(levels[level], predict_logits(model, images, 7, level, dtype=None), atol=1e-5)
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
                             "batch_size": 50, "amp": False, "ema_every": 2, "progressive_from": 0,
                             **changes})
    torch.manual_seed(seed)
    model = build_model("lenet", 2, (3, 32, 32))
    images, labels = toy_data()
    loader = BatchLoader(images, labels, params.batch_size,
        Sampling(crop_padding=2, flip=True, shuffle=True, drop_last=True, seed=seed))
    groups = param_groups(model, Rates(params.lr, params.lr, 0.0, 1.0))
    return Training(model, groups, params, loader, Env(CPU, pick_precision(CPU, params.amp)))


def test_augmentations_left_auto_are_refused_not_taken_as_on() -> None:
    """`auto` is resolved for the data set by params.load_params; a TrainParams built without it
    must not flip digits."""
    images, labels = toy_data()
    with pytest.raises(ValueError, match=r"train.flip is still 'auto'"):
        training_loader(train_params(flip="auto"), images, labels, seed=0)
    with pytest.raises(ValueError, match=r"train.tta is still 'auto'"):
        final_levels(train_params(tta="auto"))
    assert final_levels(train_params(tta="flip")) == ["none", "flip"]


def test_training_learns_a_separable_toy_task() -> None:
    training = make_training()
    losses = []
    for _ in range(3):
        losses.append(train_one_epoch(training)["loss"])
        training.epoch += 1
    assert training.step == math.ceil(4 * 3.0)
    assert losses[-1] < losses[0]
    images, labels = toy_data(seed=1)
    accuracy = (predict_logits(training.model, images, 100, "none", None).argmax(1) == labels)
    assert accuracy.float().mean() > 0.9


def test_non_finite_loss_stops_with_epoch_and_step() -> None:
    training = make_training(lr=1e30, optimizer="sgd", momentum=0.0, nesterov=False)
    with pytest.raises(StageError, match=r"non-finite loss at epoch \d+, step \d+; lower train.lr"):
        for _ in range(3):
            train_one_epoch(training)
            training.epoch += 1


def test_non_finite_loss_in_half_precision_names_it_and_float32_as_the_way_out() -> None:
    plain = make_training(lr=1e30, optimizer="sgd", momentum=0.0, nesterov=False)
    training = Training(plain.model, plain.groups, plain.params, plain.loader,
                        Env(CPU, devices.Precision(torch.bfloat16, "amp auto: the CPU has AVX512_BF16")))
    with pytest.raises(StageError, match=r"non-finite loss at epoch \d+, step \d+ in bfloat16 "
                       r"\(amp auto: the CPU has AVX512_BF16\); set train.amp: false"):
        for _ in range(3):
            train_one_epoch(training)
            training.epoch += 1


def airbench_training(scratch: bool = False, **changes) -> Training:
    """airbench on 16 toy images, 2 steps an epoch, the whitening bias trained for 1 epoch;
    `scratch`: with the train stage's groups (Muon's, freezing's) instead of plain ones."""
    params = train_params(**{"epochs": 3.0, "batch_size": 8, "amp": False, "ema_every": 0, "progressive_from": 0,
                             "whiten_bias_epochs": 1, **changes})
    torch.manual_seed(0)
    images, labels = toy_data(16)
    model = AirbenchNet(2, 3, 32, 32).to(memory_format=torch.channels_last)
    loader = BatchLoader(images, labels, 8,
        Sampling(crop_padding=2, flip=True, shuffle=True, drop_last=True, seed=0))
    rates = Rates(0.1, 0.1, 0.0, 64.0, whiten_bias_epochs=params.whiten_bias_epochs)
    groups = scratch_groups(model, params) if scratch else param_groups(model, rates)
    return Training(model, groups, params, loader, Env(CPU, pick_precision(CPU, params.amp)))


@pytest.mark.slow
def test_compile_compiles_once_across_the_whitening_bias_freeze() -> None:
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    training = airbench_training(compile=True)
    flags = {name: p.requires_grad for name, p in training.model.named_parameters()}
    biases = []
    for _ in range(3):
        train_one_epoch(training)
        training.epoch += 1
        biases.append(training.model.whiten.bias.detach().clone())
        assert {n: p.requires_grad for n, p in training.model.named_parameters()} == flags
    assert counters["stats"]["unique_graphs"] == 1  # guards on requires_grad never failed: no recompile
    assert torch.equal(biases[0], biases[2])  # frozen after epoch 1 by a zero learning rate
    assert not torch.equal(training.model.whiten.bias, torch.zeros_like(biases[0]))


@pytest.mark.parametrize("skip_frozen", [True, False])
def test_a_group_frozen_then_started_begins_without_momentum(skip_frozen) -> None:
    # SGD gathers momentum from gradients at lr 0 (Muon leaves a frozen group alone)
    training = airbench_training(whiten_bias_epochs=0, epochs=2.0, optimizer="sgd")
    training.skip_frozen = skip_frozen
    training.groups = [dataclasses.replace(g, start=1) if g.name == "head" else g for g in training.groups]
    head = training.model.head.weight
    before = head.detach().clone()
    train_one_epoch(training)
    training.epoch += 1
    assert torch.equal(head, before)
    # with gradients while frozen SGD gathered momentum; without, it has nothing for the head
    assert (head in training.optimizer.state) is not skip_frozen
    start_groups(training)
    assert head not in training.optimizer.state
    train_one_epoch(training)
    assert not torch.equal(head, before)


def frozen_run(skip_frozen: bool) -> tuple[Training, list[dict[str, torch.Tensor]], dict[int, list[bool]]]:
    """airbench by Muon over 3 epochs, its first block frozen from epoch 1, its second from
    epoch 2: the weights before and after each epoch and, per step, whether blocks 2 and 3's
    first convs were asked for their input's gradient."""
    training = airbench_training(scratch=True, optimizer="muon", freeze_from=1, freeze_blocks=2)
    model = training.model
    training.skip_frozen = skip_frozen
    input_grads: dict[int, list[bool]] = {1: [], 2: []}
    for block, asked in input_grads.items():
        model.groups[block].conv1.register_forward_pre_hook(
            lambda m, args, asked=asked: asked.append(args[0].requires_grad))
    states = [{k: v.detach().clone() for k, v in model.state_dict().items()}]
    for _ in range(3):
        train_one_epoch(training)
        training.epoch += 1
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return training, states, input_grads


@pytest.mark.parametrize("skip_frozen", [True, False])
def test_freezing_stops_the_first_blocks_one_by_one_from_freeze_from(skip_frozen) -> None:
    training, states, input_grads = frozen_run(skip_frozen)
    weights = ("conv1.weight", "conv2.weight", "norm1.bias")
    first = [k for k in states[0] if k.startswith("groups.0.") and k.endswith(weights)]
    second = [k for k in states[0] if k.startswith("groups.1.") and k.endswith(weights)]
    later = ["groups.2.conv1.weight", "groups.2.conv2.weight", "head.weight"]
    assert len(first) == len(second) == 3
    for key in first:  # trained in epoch 0, then not one bit changes (not even Muon's rescaling)
        assert not torch.equal(states[0][key], states[1][key]), key
        assert torch.equal(states[1][key], states[2][key]) and torch.equal(states[2][key], states[3][key]), key
    for key in second:  # trained in epochs 0 and 1, then frozen
        assert not torch.equal(states[1][key], states[2][key]) and torch.equal(states[2][key], states[3][key]), key
    for key in later:
        assert not torch.equal(states[2][key], states[3][key]), key
    if skip_frozen:  # one eager process: nothing before a frozen block's successor needs a gradient
        assert input_grads == {1: [True] * 2 + [False] * 4, 2: [True] * 4 + [False] * 2}
        assert all(p.grad is None for p in training.model.groups[0].parameters())
        assert all(p.grad is None for p in training.model.groups[1].parameters())
    else:  # DDP's way: gradients computed, and the frozen groups step at lr 0
        assert all(all(asked) for asked in input_grads.values())


def test_freezing_trains_exactly_as_with_the_gradients_computed() -> None:
    _, skipped, _ = frozen_run(True)
    _, computed, _ = frozen_run(False)
    for key, value in computed[-1].items():
        assert torch.equal(skipped[-1][key], value), key


def test_frozen_groups_get_no_gradients_and_training_is_unchanged() -> None:
    """One eager process: after the stem bias's epoch it has no gradient, nor has anything
    before the first conv; the weights are bit for bit those of a run computing them all."""
    runs = {}
    for skip in (True, False):
        training = airbench_training(whiten_bias_epochs=1, epochs=3.0)
        assert training.skip_frozen  # one process, not compiled
        training.skip_frozen = skip
        inputs_need_grad = []
        hook = training.model.groups[0].conv1.register_forward_pre_hook(
            lambda module, args: inputs_need_grad.append(args[0].requires_grad))
        for _ in range(3):
            train_one_epoch(training)
            assert (training.model.whiten.bias.grad is None) is (skip and training.epoch >= 1)
            training.epoch += 1
        hook.remove()
        assert inputs_need_grad == [True] * 2 + [not skip] * 4  # 2 steps an epoch
        runs[skip] = training.model.state_dict()
    for key, value in runs[False].items():
        assert torch.equal(runs[True][key], value), key


def test_a_backbone_frozen_for_an_epoch_gets_no_gradients_in_it() -> None:
    training = airbench_training(epochs=2.0)
    training.groups = [g if g.name == "head" else dataclasses.replace(g, start=1) for g in training.groups]
    train_one_epoch(training)
    with_grad = [name for name, p in training.model.named_parameters() if p.grad is not None]
    assert with_grad == ["head.weight"]
    training.epoch += 1
    train_one_epoch(training)
    assert training.model.groups[0].conv1.weight.grad is not None


def test_warm_up_leaves_weights_optimizer_and_random_draws_as_they_were() -> None:
    reference, warmed = make_training(), make_training()
    warm_up(warmed, toy_data(20))
    assert warmed.optimizer.state_dict()["state"] == {}
    for key, value in reference.model.state_dict().items():
        assert torch.equal(warmed.model.state_dict()[key], value), key
    assert torch.equal(warmed.loader.generator.get_state(), reference.loader.generator.get_state())
    for _ in range(2):
        train_one_epoch(reference)
        train_one_epoch(warmed)
    for key, value in reference.model.state_dict().items():
        assert torch.equal(warmed.model.state_dict()[key], value), key


@pytest.mark.parametrize("every, validated", [(0, [3]), (1, [1, 2, 3]), (2, [2, 3])])
def test_validation_runs_every_eval_every_epochs_and_after_the_last(tmp_path, every, validated) -> None:
    training = make_training(eval_every=every)
    rows = []
    fit(training, toy_data(20), Checkpoint(tmp_path / "c.pt", "x"), lambda e, row: rows.append(row))
    assert [e + 1 for e, row in enumerate(rows) if "val/loss" in row] == validated
    assert all("train/loss" in row for row in rows)


def test_training_time_counts_the_final_validation_but_not_the_others(tmp_path, monkeypatch) -> None:
    now = [0.0]
    monkeypatch.setattr(clock.time, "perf_counter", lambda: now[0])
    real_predict = loop.predict_levels
    levels_asked = []

    def slow_predict(*args, **kwargs):
        now[0] += 1000.0  # each validation "takes" 1000 s
        levels_asked.append(args[3])
        return real_predict(*args, **kwargs)
    monkeypatch.setattr(loop, "predict_levels", slow_predict)
    training = make_training(eval_every=1, tta="flip")
    fit(training, toy_data(20), Checkpoint(tmp_path / "c.pt", "x"), lambda e, row: None)
    # no warm-up on an eager CPU run; the last epoch's validation is the final one, timed
    assert levels_asked == [["none"], ["none"], ["none", "flip"]]
    assert training.watch.seconds() == 1000.0
    assert training.watch.wall_seconds() == 3000.0
    assert set(training.final_logits) == {"none", "flip"}


def test_checkpoint_rng_states_never_become_device_tensors(tmp_path) -> None:
    training = make_training()
    fit(training, None, Checkpoint(tmp_path / "c.pt", "x"), lambda e, row: None)
    # as resume on a GPU would see it if it mapped the checkpoint to the device
    on_meta = load_weights(tmp_path / "c.pt", "meta")
    assert on_meta["model"]["fc1.weight"].device.type == "meta"
    for key, generator_state in (("loader_rng", training.loader.generator.get_state()),
                                 ("torch_rng", torch.get_rng_state())):
        assert isinstance(on_meta[key], bytes)
        state = rng_tensor(on_meta[key])
        assert state.device.type == "cpu" and torch.equal(state, generator_state)
        torch.Generator().set_state(state)  # accepted: a CPU byte tensor


def test_fp16_trains_with_a_loss_scaler_and_resumes_it(tmp_path) -> None:
    # fp16 is MPS's autocast type; the CPU runs the same code path here
    training = make_training()
    training = Training(training.model, training.groups, training.params, training.loader,
                        Env(CPU, devices.Precision(torch.float16, "test")))
    assert training.scaler.is_enabled() and not make_training().scaler.is_enabled()
    fit(training, None, Checkpoint(tmp_path / "c.pt", "x"), lambda e, row: None)
    assert all(math.isfinite(row["train/loss"]) for row in training.history)
    saved = load_weights(tmp_path / "c.pt")["scaler"]
    assert saved["scale"] == training.scaler.get_scale()


@pytest.mark.parametrize("shape", [(64, 576), (576, 64), (256, 2304)])
def test_orthogonalize_sets_every_singular_value_near_one(shape) -> None:
    """Singular values spread over a decade come out in the quintic's band around 1 (three
    iterations: not exactly 1, by design)."""
    torch.manual_seed(0)
    k = min(shape)
    left, right = torch.linalg.qr(torch.randn(shape[0], k))[0], torch.linalg.qr(torch.randn(shape[1], k))[0]
    matrix = left @ torch.diag(torch.logspace(-1, 0, k)) @ right.T
    singular = torch.linalg.svdvals(orthogonalize(matrix))
    assert singular.min() > 0.5 and singular.max() < 1.25


def test_muon_steps_filters_orthogonally_and_everything_else_as_sgd() -> None:
    """The Muon optimizer's SGD groups match torch's SGD exactly; its filter groups keep their
    norm at sqrt(output channels) and move by lr along an orthogonalised direction."""
    torch.manual_seed(0)
    conv, bias = torch.nn.Parameter(torch.randn(8, 4, 3, 3)), torch.nn.Parameter(torch.randn(8))
    twin = torch.nn.Parameter(bias.detach().clone())
    muon = Muon([{"params": [conv], "lr": 0.1, "weight_decay": 0.0, "orthogonal": True,
                       "momentum": 0.6},
                      {"params": [bias], "lr": 0.05, "weight_decay": 0.01}], momentum=0.85, nesterov=True)
    sgd = torch.optim.SGD([twin], lr=0.05, weight_decay=0.01, momentum=0.85, nesterov=True)
    for _ in range(3):
        before = conv.detach().clone()
        for param in (conv, bias, twin):
            param.grad = torch.randn_like(param)
        twin.grad = bias.grad.clone()
        muon.step()
        sgd.step()
        step = (before * 8 ** 0.5 / before.norm() - conv.detach()).reshape(8, -1) / 0.1
        assert torch.linalg.svdvals(step).min() > 0.3  # every direction moved: orthogonalised
        assert torch.allclose(bias, twin)
    assert conv.norm().item() == pytest.approx(8 ** 0.5, rel=0.05)  # renormalised, then one step


def test_optimizer_muon_gives_the_conv_filters_their_own_group() -> None:
    params = train_params(optimizer="muon", muon_lr=0.2, muon_momentum=0.6)
    model = AirbenchNet(10, 3, 32, 32)
    training = Training(model, scratch_groups(model, params), params, BatchLoader(*toy_data(16), 8,
                            Sampling(crop_padding=0, flip=False, shuffle=True, drop_last=True,
                                     seed=0)), Env(CPU, pick_precision(CPU, False)))
    filters = [g for g in training.groups if g.orthogonal]  # the default's frozen first block apart
    assert {id(p) for g in filters for p in g.params} == {id(p) for p in model.parameters()
                                                         if p.ndim == 4 and p.requires_grad}
    for group in filters:
        spec = training.optimizer.param_groups[training.groups.index(group)]
        assert (spec["lr"], spec["momentum"], spec["weight_decay"]) == (0.2, 0.6, 0.0)
    assert all(not g.orthogonal for g in param_groups(model, Rates(1.0, 1.0, 0.0, 1.0)))  # finetune: SGD


def test_progressive_resizing_grows_the_images_to_full_size_and_trains_on_them() -> None:
    training = airbench_training(epochs=4.0, progressive_from=16, progressive_until=0.5)
    seen = []
    training.model.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[-1]))
    sizes = []
    for _ in range(4):
        sizes.append(progressive_size(training))
        train_one_epoch(training)
        training.epoch += 1
    assert sizes == [(16, 16), (24, 24), None, None]  # full size (32) from half the epochs on
    assert seen == [16, 16, 24, 24, 32, 32, 32, 32]  # 2 steps an epoch


def test_progressive_step_rounds_each_epoch_to_a_cheap_side() -> None:
    def sides(step: int) -> list:
        training = airbench_training(epochs=12.0, progressive_from=16, progressive_until=0.5,
                                      progressive_step=step)
        found = []
        for epoch in range(8):
            training.epoch = epoch
            size = progressive_size(training)
            found.append(size and size[0])
        return found

    assert sides(1) == [16, 19, 21, 24, 27, 29, None, None]  # the linear ramp as it is
    assert sides(4) == [16, 20, 20, 24, 28, 28, None, None]  # each to its nearest multiple of 4


def test_airbench_costs_a_step_more_at_a_side_past_a_multiple_of_4() -> None:
    """Why progressive_step 4 (params.yaml): its poolings' floors make 29 px cost about a
    quarter more than 28, while 25 costs nearly what 28 does (forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = AirbenchNet(10, 3, 32, 32)
    flops = {}
    for side in (25, 28, 29):
        with FlopCounterMode(display=False) as counter:
            model(torch.randn(2, 3, side, side)).sum().backward()
        flops[side] = counter.get_total_flops()
    assert flops[29] > 1.2 * flops[28]
    assert flops[28] < 1.1 * flops[25]


@pytest.mark.parametrize("epochs, until, sizes", [
    (2.0, 0.6, [None, None]),  # a ramp of 1.2 epochs: none, rather than one small epoch
    (3.0, 1.0, [(16, 16), (24, 24), None]),  # the last epoch full size even at until 1
    (11.5, 0.6, [(16, 16), (20, 20), (20, 20), (24, 24), (24, 24), (28, 28), (28, 28)] + [None] * 5),
])
def test_progressive_resizing_needs_a_ramp_of_two_epochs_and_ends_at_full_size(epochs, until, sizes) -> None:
    training = airbench_training(epochs=epochs, progressive_from=16, progressive_until=until)
    found = []
    for epoch in range(len(sizes)):
        training.epoch = epoch
        found.append(progressive_size(training))
    assert found == sizes


def test_selection_trains_on_the_highest_loss_examples_from_select_from_on() -> None:
    # 200 toy images, batches of 50: two whole epochs of 4 steps, then two over the 100
    # examples that lost most when last seen, 2 steps each (the lr schedule plans for 12)
    training = make_training(epochs=4.0, select_from=2, select_fraction=0.5)
    assert training.total_steps == 4 * 2 + 2 * 2
    assert torch.isinf(training.losses).all()  # nothing seen yet
    for epoch in range(4):
        before = training.losses.clone()
        train_one_epoch(training)
        training.epoch += 1
        trained = training.losses != before  # every example an epoch trains on is re-scored
        if epoch < 2:
            assert training.loader.subset is None and trained.all()
        else:
            assert trained.sum() == 100 and torch.equal(trained.nonzero().flatten().sort().values,
                                                        training.loader.subset.sort().values)
            assert before[trained].min() >= before[~trained].max()  # the hardest half
    assert training.step == training.total_steps


def test_a_run_resumed_after_selection_started_matches_the_uninterrupted_one() -> None:
    whole = make_training(epochs=4.0, select_from=1, select_fraction=0.5, ema_every=0)
    for _ in range(4):
        train_one_epoch(whole)
        whole.epoch += 1
    first = make_training(epochs=4.0, select_from=1, select_fraction=0.5, ema_every=0)
    for _ in range(2):
        train_one_epoch(first)
        first.epoch += 1
    state = first.state()
    assert state["losses"].device.type == "cpu" and torch.isfinite(state["losses"]).all()
    resumed = make_training(epochs=4.0, select_from=1, select_fraction=0.5, ema_every=0)
    resumed.load_state(state)
    for _ in range(2):
        train_one_epoch(resumed)
        resumed.epoch += 1
    assert torch.equal(resumed.losses, whole.losses)
    for key, value in whole.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key


def test_a_selection_smaller_than_one_batch_is_refused_with_the_knobs_to_change() -> None:
    with pytest.raises(StageError, match=r"train.select_fraction: 0.2 of 200 training images is 40, "
                                         r"not one batch of 50; raise it or lower train.batch_size"):
        make_training(epochs=4.0, select_from=2, select_fraction=0.2)
