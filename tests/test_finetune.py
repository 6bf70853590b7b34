import pickle
from pathlib import Path

import pytest
import torch
import torchvision

from stages.finetune import init_arch, match_weights, read_state_dict
from stages.lib.card import save_model
from stages.lib.data import BatchLoader, Sampling
from stages.lib.devices import pick_precision
from stages.lib.loop import Env, Training, train_one_epoch
from stages.lib.nets import build_model
from stages.lib.optim import Rates, param_groups
from stages.lib.outputs import StageError
from tests.conftest import ROOT, model_card
from tests.test_loop import CPU, toy_data, train_params


def saved(tmp_path: Path, state: object, name: str = "init.pt") -> Path:
    path = tmp_path / name
    torch.save(state, path)
    return path


def test_own_state_dict_loads_every_key(tmp_path: Path) -> None:
    source = build_model("airbench", 10, (3, 32, 32))
    model = build_model("airbench", 10, (3, 32, 32))
    path = saved(tmp_path, source.state_dict())
    report = match_weights(model, read_state_dict(path), path)
    assert report["loaded"] == list(model.state_dict()) and report["reinitialised"] == []
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)


def test_torchvision_imagenet_resnet18_swaps_head_and_stem(tmp_path: Path) -> None:
    imagenet = torchvision.models.resnet18(num_classes=1000)  # the ImageNet checkpoint's layout
    path = saved(tmp_path, imagenet.state_dict())
    model = build_model("resnet18", 10, (3, 32, 32))
    report = match_weights(model, read_state_dict(path), path)
    assert sorted(report["reinitialised"]) == ["conv1.weight", "fc.bias", "fc.weight"]
    assert sorted(report["skipped"]) == ["conv1.weight", "fc.bias", "fc.weight"]
    assert len(report["loaded"]) == len(model.state_dict()) - 3
    assert torch.equal(model.layer4[1].conv2.weight, imagenet.layer4[1].conv2.weight)


def test_the_photos_preset_loads_torchvision_resnet18_whole_but_its_head(tmp_path: Path) -> None:
    """presets/photos_resnet18.yaml's arch takes torchvision's ImageNet file stem and all."""
    from stages.lib.params import with_preset

    preset = with_preset(ROOT / "presets" / "photos_resnet18.yaml", ROOT / "params.yaml")
    arch, size = preset["finetune"]["arch"], preset["preprocess"]["size"]
    imagenet = torchvision.models.resnet18(num_classes=1000)
    path = saved(tmp_path, imagenet.state_dict())
    model = build_model(arch, 5, (3, *size))
    report = match_weights(model, read_state_dict(path), path)
    assert sorted(report["reinitialised"]) == sorted(report["skipped"]) == ["fc.bias", "fc.weight"]
    assert torch.equal(model.conv1.weight, imagenet.conv1.weight)
    assert model(torch.zeros(2, 3, *size)).shape == (2, 5)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_wrapper_prefixes_are_stripped(tmp_path: Path, prefix: str) -> None:
    source = build_model("lenet", 10, (3, 32, 32)).state_dict()
    path = saved(tmp_path, {prefix + k: v for k, v in source.items()})
    report = match_weights(build_model("lenet", 10, (3, 32, 32)), read_state_dict(path), path)
    assert len(report["loaded"]) == len(source)


def test_another_architecture_is_refused(tmp_path: Path) -> None:
    path = saved(tmp_path, build_model("lenet", 10, (3, 32, 32)).state_dict())
    with pytest.raises(StageError, match="lacks backbone key 'whiten.weight'.*finetune.arch"):
        match_weights(build_model("airbench", 10, (3, 32, 32)), read_state_dict(path), path)


def test_backbone_shape_mismatch_is_refused(tmp_path: Path) -> None:
    state = build_model("lenet", 10, (3, 32, 32)).state_dict()
    state["fc2.weight"] = torch.zeros(84, 99)
    path = saved(tmp_path, state)
    with pytest.raises(StageError, match=r"fc2.weight has shape \(84, 99\), the model needs \(84, 120\)"):
        match_weights(build_model("lenet", 10, (3, 32, 32)), read_state_dict(path), path)


def test_head_for_other_classes_is_reinitialised(tmp_path: Path) -> None:
    path = saved(tmp_path, build_model("lenet", 100, (3, 32, 32)).state_dict())
    report = match_weights(build_model("lenet", 10, (3, 32, 32)), read_state_dict(path), path)
    assert report["reinitialised"] == ["fc3.weight", "fc3.bias"]


def test_non_finite_weights_are_refused(tmp_path: Path) -> None:
    state = build_model("lenet", 10, (3, 32, 32)).state_dict()
    state["conv1.weight"][0, 0, 0, 0] = float("nan")
    path = saved(tmp_path, state)
    with pytest.raises(StageError, match="conv1.weight holds NaN or inf"):
        match_weights(build_model("lenet", 10, (3, 32, 32)), read_state_dict(path), path)


class Exploit:
    def __reduce__(self):
        return (exec, ("open('/tmp/pwned_by_weights', 'w').write('x')",))


def test_bad_weight_files_are_refused_without_running_code(tmp_path: Path) -> None:
    code = tmp_path / "code.pt"
    with open(code, "wb") as f:
        torch.save({"weight": torch.zeros(1), "payload": Exploit()}, f)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(saved(tmp_path, {"w": torch.zeros(100)}).read_bytes()[:200])
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"w": [1, 2]}))
    listed = saved(tmp_path, [torch.zeros(1)], "list.pt")
    for path, message in [(code, "Unsupported global: GLOBAL exec"), (truncated, "not a loadable"),
                          (plain, "not a loadable"), (listed, "must hold a dict of tensors"),
                          (tmp_path / "missing.pt", "does not exist")]:
        with pytest.raises(StageError, match=message):
            read_state_dict(path)
    assert not Path("/tmp/pwned_by_weights").exists()


def test_freeze_epochs_train_only_the_head_first() -> None:
    params = train_params(arch="lenet", optimizer="adam", lr=0.01, epochs=2.0, batch_size=50, amp=False,
                          ema_every=0, progressive_from=0)
    model = build_model("lenet", 2, (3, 32, 32))
    backbone = {k: v.clone() for k, v in model.named_parameters() if not k.startswith("fc3.")}
    head = model.fc3.weight.clone()
    images, labels = toy_data()
    loader = BatchLoader(images, labels, 50,
        Sampling(crop_padding=0, flip=False, shuffle=True, drop_last=True, seed=0))
    groups = param_groups(model, Rates(0.01, 0.05, 0.0, 1.0, freeze_epochs=1, whiten_bias_epochs=0))
    training = Training(model, groups, params, loader, Env(CPU, pick_precision(CPU, params.amp)))
    train_one_epoch(training)
    assert all(torch.equal(p, backbone[k]) for k, p in model.named_parameters() if k in backbone)
    assert not torch.equal(model.fc3.weight, head)
    training.epoch += 1
    train_one_epoch(training)
    assert not torch.equal(model.fc1.weight, backbone["fc1.weight"])


def test_the_architecture_comes_from_the_model_json_beside_the_init_file(tmp_path: Path) -> None:
    saved = tmp_path / "models" / "train"
    save_model(build_model("lenet", 10, (3, 32, 32)), saved, model_card("lenet", [str(i) for i in range(10)]))
    assert init_arch(saved / "model.pt", None) == "lenet"
    assert init_arch(saved / "model.pt", "lenet") == "lenet"
    with pytest.raises(StageError, match=r"finetune.arch is 'resnet18' but .*model.json says .* 'lenet'"):
        init_arch(saved / "model.pt", "resnet18")


def test_a_bare_state_dict_needs_finetune_arch(tmp_path: Path) -> None:
    bare = tmp_path / "resnet18-imagenet.pth"
    torch.save(build_model("resnet18", 1000, (3, 32, 32)).state_dict(), bare)
    assert init_arch(bare, "resnet18") == "resnet18"
    with pytest.raises(StageError, match="no model.json beside it .* set finetune.arch"):
        init_arch(bare, None)


def test_finetune_runs_trains_loop_at_full_size_with_its_own_rates() -> None:
    import dataclasses as dc

    from stages.finetune import loop_params
    from stages.lib.params import load_params

    params = load_params(ROOT / "params.yaml")
    assert params.train.progressive_from > 0  # the default trains from scratch progressively
    params = dc.replace(params, train=dc.replace(params.train, select_from=5, freeze_from=5),
                        finetune=dc.replace(params.finetune, init="/absent/model.pt", arch="airbench"))
    loop = loop_params(params)
    assert loop.progressive_from == 0 and loop.lr == params.finetune.lr
    assert loop.select_from == 0 and loop.freeze_from == 0  # every example, every layer
    assert (loop.epochs, loop.batch_size) == (params.finetune.epochs, params.finetune.batch_size)
