import pytest
import torch
import torchvision

from stages.model import ARCHS, AirbenchNet, build_model, init_whitening, load_trained, save_model
from stages.outputs import StageError


@pytest.mark.parametrize("arch", ARCHS)
def test_each_arch_maps_images_to_one_logit_per_class(arch: str) -> None:
    model = build_model(arch, num_classes=7).eval()
    with torch.no_grad():
        logits = model(torch.randn(4, 3, 32, 32))
    assert logits.shape == (4, 7)
    assert any(k.startswith(model.HEAD) for k in model.state_dict())


def test_resnet18_has_torchvision_key_names() -> None:
    ours = build_model("resnet18", 10).state_dict()
    reference = torchvision.models.resnet18(num_classes=10).state_dict()
    assert list(ours) == list(reference)
    differing = [k for k in ours if ours[k].shape != reference[k].shape]
    assert differing == ["conv1.weight"]  # the CIFAR stem: 3x3 instead of 7x7


def test_whitening_makes_patch_covariance_near_identity() -> None:
    torch.manual_seed(0)
    # Strongly correlated channels and pixels: a smoothed, mixed random image batch.
    base = torch.nn.functional.avg_pool2d(torch.randn(256, 3, 34, 34), 3, stride=1)
    images = base + 0.5 * base.mean(1, keepdim=True)
    model = AirbenchNet(10)
    init_whitening(model.whiten, images, eps=0.0)
    with torch.no_grad():
        out = torch.nn.functional.conv2d(images, model.whiten.weight[:12])  # without the negations
    flat = out.permute(0, 2, 3, 1).reshape(-1, 12).double()
    covariance = flat.T @ flat / len(flat)
    assert torch.allclose(covariance, torch.eye(12, dtype=torch.float64), atol=1e-3)
    assert torch.equal(model.whiten.weight[12:], -model.whiten.weight[:12])


def test_saved_model_reloads_with_weights_only(tmp_path) -> None:
    model = build_model("lenet", 3)
    sidecar = {"arch": "lenet", "classes": ["a", "b", "c"], "normalization": {}, "input_size": [32, 32],
               "params": {}}
    save_model(model, tmp_path / "m", sidecar)
    loaded, meta = load_trained(tmp_path / "m")
    assert meta == sidecar
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    (tmp_path / "m" / "model.json").write_text('{"arch": "lenet", "classes": ["a"], "input_size": [32, 32]}')
    with pytest.raises(StageError, match="cannot load it as a lenet state_dict for 1 classes"):
        load_trained(tmp_path / "m")
    for size in ("", ', "input_size": [32]'):  # the input size is the sidecar's, never assumed
        (tmp_path / "m" / "model.json").write_text('{"arch": "lenet", "classes": ["a", "b", "c"]%s}' % size)
        with pytest.raises(StageError, match="model.json: cannot read the model's sidecar"):
            load_trained(tmp_path / "m")
