import json
import re

import pytest
import torch
import torchvision

from stages.lib.archs import registry
from stages.lib.card import load_trained, save_model
from stages.lib.nets import (AirbenchNet, Conv3x3, DiracConv, PatchMatmulConv, as_conv3x3,
                             build_model, init_whitening)
from stages.lib.outputs import StageError
from tests.conftest import model_card


@pytest.mark.parametrize("arch", registry())
@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 28, 28), (1, 32, 32), (3, 64, 48)])
def test_each_arch_maps_images_of_any_shape_to_one_logit_per_class(arch: str, shape: tuple) -> None:
    model = build_model(arch, 7, shape).eval()
    with torch.no_grad():
        logits = model(torch.randn(4, *shape))
    assert logits.shape == (4, 7)
    roles = model.roles()  # every trainable parameter has a role; the head is the HEAD's keys
    assert set(roles) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n, r in roles.items() if r == "head"} == {
        n for n in roles if n.startswith(model.HEAD)} != set()
    assert set(model.STEM) <= set(model.state_dict())
    # the registry's blocks are the model's own: each prefix names trainable parameters
    assert all(any(n.startswith(block) for n in roles) for block in registry()[arch].blocks)


def test_airbench_pools_as_airbench94_at_32x32() -> None:
    """The adaptive pool is airbench's MaxPool2d(3) over the final 3x3 maps: same logits."""
    torch.manual_seed(0)
    model = build_model("airbench", 10, (3, 32, 32)).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = model.groups(torch.nn.functional.gelu(model.whiten(images)))
        reference = model.head(torch.nn.functional.max_pool2d(features, 3).flatten(1)) * model.LOGIT_SCALE
        assert features.shape[-2:] == (3, 3)
        assert torch.equal(model(images), reference)


def test_the_patch_matmul_conv_has_the_convolutions_gradients() -> None:
    """Forward, input and weight gradients of conv2d (3x3, padding 1), in float64 where they
    must agree to rounding; also with channels_last input and a non-square map."""
    torch.manual_seed(0)
    for memory_format in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(3, 5, 4, 6, dtype=torch.float64).contiguous(memory_format=memory_format)
        weight = torch.randn(7, 5, 3, 3, dtype=torch.float64)
        assert torch.autograd.gradcheck(PatchMatmulConv.apply, (x.requires_grad_(), weight.requires_grad_()))
        grads = torch.randn(3, 7, 4, 6, dtype=torch.float64)
        ours = PatchMatmulConv.apply(x, weight)
        reference = torch.nn.functional.conv2d(x, weight, padding=1)
        assert torch.allclose(ours, reference)
        for a, b in zip(torch.autograd.grad(ours, (x, weight), grads),
                        torch.autograd.grad(reference, (x, weight), grads), strict=True):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("side, matmul", [(3, True), (6, True), (7, False)])
def test_dirac_conv_takes_the_patch_matmul_on_small_maps_training_in_bf16(side: int, matmul: bool) -> None:
    """Only for training (gradients on) under CPU bf16 autocast on maps up to the bound; its
    gradients are oneDNN's to bf16 rounding, and the weight's is float32 like the weight."""
    torch.manual_seed(0)
    conv = DiracConv(16, 32).to(memory_format=torch.channels_last)
    x = torch.randn(8, 16, side, side).contiguous(memory_format=torch.channels_last).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x)
    assert out.dtype == torch.bfloat16
    assert ("PatchMatmulConv" in out.grad_fn.name()) == matmul
    grads = torch.autograd.grad(out.float().square().sum(), (x, conv.weight))
    assert grads[1].dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = torch.nn.functional.conv2d(x, conv.weight, padding=1)
    assert torch.equal(out, reference)
    expected = torch.autograd.grad(reference.float().square().sum(), (x, conv.weight))
    for ours, theirs in zip(grads, expected, strict=True):
        assert torch.allclose(ours, theirs, rtol=2e-2, atol=1e-2 * theirs.abs().max().item())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv(x).grad_fn is None  # evaluation: conv2d itself
    assert conv(x).grad_fn.name() == "ConvolutionBackward0"  # float32: conv2d itself


def test_the_tutorials_networks_have_their_published_sizes() -> None:
    """The quickstart MLP (784-512-512-10), the MNIST MLP (784-128-10) and LeNet on 1x32x32
    (400-120-84-10), as the tutorials build them."""
    sizes = {arch: [tuple(p.shape) for n, p in build_model(arch, 10, (1, 28, 28)).named_parameters()
                    if n.endswith("weight")] for arch in ("mlp", "mnist_mlp")}
    assert sizes["mlp"] == [(512, 784), (512, 512), (10, 512)]
    assert sizes["mnist_mlp"] == [(128, 784), (10, 128)]
    lenet = build_model("lenet", 10, (1, 32, 32))
    assert lenet.conv1.weight.shape == (6, 1, 5, 5) and lenet.fc1.weight.shape == (120, 400)
    with pytest.raises(ValueError, match="at least 16x16"):
        build_model("lenet", 10, (1, 12, 12))


def test_resnet18_has_torchvision_key_names() -> None:
    ours = build_model("resnet18", 10, (3, 32, 32)).state_dict()
    reference = torchvision.models.resnet18(num_classes=10).state_dict()
    assert list(ours) == list(reference)
    differing = [k for k in ours if ours[k].shape != reference[k].shape]
    assert differing == ["conv1.weight"]  # the CIFAR stem: 3x3 instead of 7x7


def test_resnet18s_stride_1_convs_take_the_small_map_path_with_the_weights_drawn_as_before() -> None:
    """Its blocks' stride-1 3x3 convs become Conv3x3 (layer4 trains on 4x4 maps at 32 px),
    holding the weights torchvision drew; the random stream goes on as without the swap."""
    torch.manual_seed(0)
    model = build_model("resnet18", 10, (3, 32, 32))
    after = torch.rand(4)
    torch.manual_seed(0)
    reference = torchvision.models.ResNet(torchvision.models.resnet.BasicBlock, [2, 2, 2, 2], num_classes=10)
    reference.conv1 = torch.nn.Conv2d(3, 64, 3, padding=1, bias=False)
    assert torch.equal(torch.rand(4), after)
    for (name, ours), theirs in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.equal(ours, theirs), name
    # 16 block convs but the first conv of layer2, layer3 and layer4, which strides 2
    assert sum(isinstance(m, Conv3x3) for m in model.modules()) == 13
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "PatchMatmulConv" in model.layer4[1].conv1(torch.randn(2, 512, 4, 4)).grad_fn.name()
    with pytest.raises(ValueError, match="not a 3x3, stride-1"):
        as_conv3x3(model.layer4[0].conv1)


def test_whitening_makes_patch_covariance_near_identity() -> None:
    torch.manual_seed(0)
    # Strongly correlated channels and pixels: a smoothed, mixed random image batch.
    base = torch.nn.functional.avg_pool2d(torch.randn(256, 3, 34, 34), 3, stride=1)
    images = base + 0.5 * base.mean(1, keepdim=True)
    model = AirbenchNet(10, 3, 32, 32)
    init_whitening(model.whiten, images, eps=0.0)
    with torch.no_grad():
        out = torch.nn.functional.conv2d(images, model.whiten.weight[:12])  # without the negations
    flat = out.permute(0, 2, 3, 1).reshape(-1, 12).double()
    covariance = flat.T @ flat / len(flat)
    assert torch.allclose(covariance, torch.eye(12, dtype=torch.float64), atol=1e-3)
    assert torch.equal(model.whiten.weight[12:], -model.whiten.weight[:12])


def test_saved_model_reloads_with_weights_only(tmp_path) -> None:
    model = build_model("lenet", 3, (3, 32, 32))
    card = model_card("lenet", ["a", "b", "c"])
    save_model(model, tmp_path / "m", card)
    loaded, read = load_trained(tmp_path / "m")
    assert read == card and read.shape == (3, 32, 32)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    fields = json.loads(card.to_json())
    (tmp_path / "m" / "model.json").write_text(json.dumps({**fields, "classes": ["a"]}))
    with pytest.raises(StageError, match="cannot load it as a lenet state_dict for 1 classes"):
        load_trained(tmp_path / "m")
    # the input size and channels are the card's, never assumed
    for broken in ({"input_size": [32]}, {"normalization": {"mean": [0.5] * 2, "std": [0.2] * 2}},
                   {"arch": "alexnet"}, {"hardware": None, "extra": 1}):
        (tmp_path / "m" / "model.json").write_text(json.dumps({**fields, **broken}))
        with pytest.raises(StageError, match="model.json: cannot read the model's sidecar"):
            load_trained(tmp_path / "m")
    fields.pop("input_size")
    (tmp_path / "m" / "model.json").write_text(json.dumps(fields))
    with pytest.raises(StageError, match="model.json: cannot read the model's sidecar"):
        load_trained(tmp_path / "m")


def test_a_folder_that_holds_no_model_is_named_with_what_it_is(tmp_path) -> None:
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "model.pt2").write_bytes(b"program")
    (tmp_path / "image.png").write_bytes(b"png")
    for given, said in ((tmp_path / "trian", "no such file or folder"),
                        (tmp_path / "export", r"holds an exported program \(model.pt2: load it with "
                                               r"torch.export.load\), not a saved model"),
                        (tmp_path, r"not a model folder \(it holds \['export', 'image.png'\]\)"),
                        (tmp_path / "image.png", "a file, not a model folder")):
        with pytest.raises(StageError, match=f"^{re.escape(str(given))}: {said}; a model folder holds "
                                             "model.pt \\(a state_dict\\) beside model.json"):
            load_trained(given)
