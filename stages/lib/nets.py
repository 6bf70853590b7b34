"""The architectures, each registered by name (@architecture, archs.py) and built for the
data's input shape (channels, height, width) and class count, and each declaring what
training and finetuning need to know of it, so that the loop names no architecture:

- `HEAD`: the key prefix of its classifier head (finetune re-initialises it and trains it at
  its own learning rate);
- `STEM`: the keys of its first layer, re-initialised when a pretrained file's shape differs
  (ImageNet's 7x7 RGB conv for a 3x3 one, or for 1-channel data);
- `roles()`: each trainable parameter's role for the optimizer's groups ("head", "backbone",
  and airbench's "norm_bias" and "stem_bias");
- `prepare(images)`: data-dependent initialisation before training (airbench's whitening).

What params checks without torch (the sizes it takes, its blocks) is in each one's mark.

Architectures: `airbench` (the fast default), `lenet` (the 60-minute blitz), `resnet18`
(torchvision's, CIFAR stem), `resnet18_imagenet` (torchvision's as it is, for photos and
ImageNet weights), `mlp` (the quickstart's, for Fashion-MNIST) and `mnist_mlp` (the
MNIST tutorial's, with dropout).
"""
from __future__ import annotations

import importlib

import torch
from torch import nn

from stages.lib.archs import architecture, registry

# airbench fits its whitening to 5,000 CIFAR images' 2x2 patches (31 x 31 each): enough for a
# stable covariance. Larger images give more patches each, so fewer of them are read: the
# time and memory stay those of CIFAR's at any size.
WHITENING_PATCHES = 5000 * 31 * 31
WHITENING_CHUNK = 500  # images whose patches are held at once


class Architecture(nn.Module):
    """What every architecture declares (see the module's docstring); the defaults fit a
    plain network: a head, and a backbone of everything else."""

    HEAD: str = ""
    STEM: tuple[str, ...] = ()

    def roles(self) -> dict[str, str]:
        return {name: "head" if name.startswith(self.HEAD) else "backbone"
                for name, param in self.named_parameters() if param.requires_grad}

    def prepare(self, images: torch.Tensor) -> None:
        """Nothing to fit to the data."""


@architecture("mlp")
class QuickstartMLP(Architecture):
    """The PyTorch quickstart's network: flatten, 512, ReLU, 512, ReLU, logits."""

    HEAD = "linear_relu_stack.4."
    STEM = ("linear_relu_stack.0.weight",)

    def __init__(self, num_classes: int, channels: int, height: int, width: int) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.linear_relu_stack = nn.Sequential(
            nn.Linear(channels * height * width, 512), nn.ReLU(),
            nn.Linear(512, 512), nn.ReLU(),
            nn.Linear(512, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_relu_stack(self.flatten(x))


@architecture("mnist_mlp")
class MnistMLP(Architecture):
    """The MNIST tutorial's network: flatten, 128, ReLU, dropout 0.2, logits."""

    HEAD = "layers.4."
    STEM = ("layers.1.weight",)

    def __init__(self, num_classes: int, channels: int, height: int, width: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Flatten(), nn.Linear(channels * height * width, 128), nn.ReLU(), nn.Dropout(0.2),
            nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@architecture("lenet", blocks=("conv1.", "conv2.", "fc1.", "fc2."))
class LeNet(Architecture):
    """The 60-minute blitz network (1x32x32 in the MNIST tutorial, 3x32x32 for CIFAR-10):
    two 5x5 convs with 2x2 max-pools, then 120, 84, logits; the first linear layer's width
    follows the input size."""

    HEAD = "fc3."
    STEM = ("conv1.weight",)

    def __init__(self, num_classes: int, channels: int, height: int, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.pool = nn.MaxPool2d(2)
        features = [((side - 4) // 2 - 4) // 2 for side in (height, width)]
        if min(features) < 1:
            raise ValueError(f"lenet needs images of at least 16x16, not {height}x{width}")
        self.fc1 = nn.Linear(16 * features[0] * features[1], 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class FrozenScaleBatchNorm(nn.BatchNorm2d):
    """BatchNorm whose scale stays 1 (airbench): the following conv can absorb any scale,
    and the bias alone trains, at a much higher learning rate (see loop.param_groups)."""

    def __init__(self, num_features: int) -> None:
        # momentum 0.4 = airbench's 0.6 in its convention. eps 1e-3, not airbench's 1e-12: a
        # channel nearly constant over the batch (MNIST's flat background makes some) would be
        # scaled up by 1 / its tiny std, and with it the rounding error of bf16 gradients,
        # until the BatchNorm biases' gradients (sums that nearly cancel) are that error alone.
        super().__init__(num_features, eps=1e-3, momentum=0.4)
        self.weight.requires_grad_(False)


class Conv3x3(nn.Conv2d):
    """A 3x3 conv, stride 1, padding 1, no bias (airbench's and ResNet-18's). Training in bf16
    on the CPU, maps of up to MATMUL_WGRAD_UP_TO pixels get their weight gradient from
    PatchMatmulConv: oneDNN's kernel for it slows down on small maps."""

    MATMUL_WGRAD_UP_TO = 36  # height x width; 0 = never (docs/performance.md has the measurements)

    def __init__(self, in_channels: int, out_channels: int, **kwargs: object) -> None:
        super().__init__(in_channels, out_channels, kernel_size=3, padding=1, bias=False, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
                and torch.get_autocast_dtype("cpu") == torch.bfloat16
                and x.shape[-2] * x.shape[-1] <= self.MATMUL_WGRAD_UP_TO
                and torch.is_grad_enabled() and self.weight.requires_grad):
            return super().forward(x)
        with torch.autocast("cpu", enabled=False):  # cast here, as autocast would for conv2d
            return PatchMatmulConv.apply(x.to(torch.bfloat16), self.weight.to(torch.bfloat16))


def as_conv3x3(conv: nn.Conv2d) -> Conv3x3:
    """A 3x3, stride-1, padding-1, bias-free conv as a Conv3x3 holding the same weight (built on
    the meta device: no draw from the RNG, so the run's random stream stays as it was)."""
    if (conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups, conv.bias) != (
            (3, 3), (1, 1), (1, 1), (1, 1), 1, None):
        raise ValueError(f"not a 3x3, stride-1, padding-1, bias-free conv: {conv}")
    converted = Conv3x3(conv.in_channels, conv.out_channels, device="meta")
    converted.weight = conv.weight
    return converted


class DiracConv(Conv3x3):
    """A Conv3x3 initialised partly to the identity: an implicit residual path that lets a
    plain (skip-free) stack train fast from the first step."""

    def reset_parameters(self) -> None:
        super().reset_parameters()
        nn.init.dirac_(self.weight.data[: self.in_channels])


class PatchMatmulConv(torch.autograd.Function):
    """A 3x3 conv with padding 1 whose weight gradient is one matrix product: the output
    gradient's channels x positions by the input's 3x3 patches (im2col). The forward and the
    input gradient stay oneDNN's, fast at every size.

    On small maps oneDNN's bf16 weight-gradient kernel runs far below the CPU's speed, while
    this product's speed hardly depends on the map size; on larger maps (and in float32) oneDNN's
    is as fast or faster. Hence Conv3x3's bound of 6x6: in airbench at full size only the last
    conv's 3x3 maps take this path, at 16 px the last three convs' (docs/performance.md)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor,
                weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return nn.functional.conv2d(x, weight, padding=1)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx,
                 grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad, x, weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            n, channels, height, width = grad.shape
            # a copy with contiguous rows first: the product is faster on it than on the strided view
            rows = grad.permute(1, 0, 2, 3).reshape(channels, n * height * width)
            grad_weight = (rows @ patches3x3(x)).view(channels, 3, 3, -1).permute(0, 3, 1, 2)
        return grad_x, grad_weight


def patches3x3(x: torch.Tensor) -> torch.Tensor:
    """x's 3x3 patches at every position (zero padding 1): (N * H * W, 9 * C), each row
    ordered (kernel row, kernel column, channel). One copy, fastest from channels_last."""
    n, c, h, w = x.shape
    padded = nn.functional.pad(x, (1, 1, 1, 1)).permute(0, 2, 3, 1)  # N, H+2, W+2, C
    sn, sh, sw, sc = padded.stride()
    windows = padded.as_strided((n, h, w, 3, 3, c), (sn, sh, sw, sh, sw, sc))
    return windows.reshape(n * h * w, 9 * c)


class ConvGroup(nn.Module):
    """conv -> 2x2 max-pool -> BN -> GELU -> conv -> BN -> GELU (airbench's block)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = DiracConv(in_channels, out_channels)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = FrozenScaleBatchNorm(out_channels)
        self.conv2 = DiracConv(out_channels, out_channels)
        self.norm2 = FrozenScaleBatchNorm(out_channels)
        self.activ = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.activ(self.norm1(self.pool(self.conv1(x))))
        return self.activ(self.norm2(self.conv2(x)))


# the stem's bias is no block: it stops training on its own (whiten_bias_epochs)
@architecture("airbench", any_size=True, blocks=("groups.0.", "groups.1.", "groups.2."))
class AirbenchNet(Architecture):
    """airbench94's network: frozen patch-whitening stem, three conv groups (64/256/256),
    global max-pool, a bias-free linear head scaled by 1/9 (keeps initial logits small).
    Any channel count; any size from 16x16 up (the pool is adaptive: at 32x32, airbench's
    MaxPool2d(3) over the final 3x3)."""

    HEAD = "head."
    STEM = ("whiten.weight", "whiten.bias")
    WHITEN_KERNEL = 2
    WIDTHS = (64, 256, 256)
    LOGIT_SCALE = 1 / 9

    def __init__(self, num_classes: int, channels: int, height: int, width: int) -> None:
        super().__init__()
        if min(height, width) < 16:
            raise ValueError(f"airbench needs images of at least 16x16, not {height}x{width}")
        # Twice the patch dimension: each whitening filter is kept with its negation so that
        # GELU after it loses no information.
        whiten_width = 2 * channels * self.WHITEN_KERNEL ** 2
        self.whiten = nn.Conv2d(channels, whiten_width, kernel_size=self.WHITEN_KERNEL, padding=0,
                                bias=True)
        self.whiten.weight.requires_grad_(False)
        nn.init.zeros_(self.whiten.bias)
        widths = (whiten_width, *self.WIDTHS)
        self.groups = nn.Sequential(*(ConvGroup(a, b) for a, b in zip(widths, widths[1:])))
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Linear(widths[-1], num_classes, bias=False)

    def roles(self) -> dict[str, str]:
        """The frozen-scale BatchNorms' biases train at a higher lr (loop.param_groups), the
        whitening bias only for the first `whiten_bias_epochs`."""
        norm_biases = {id(m.bias) for m in self.modules() if isinstance(m, FrozenScaleBatchNorm)}
        roles = super().roles()
        for name, param in self.named_parameters():
            if id(param) in norm_biases:
                roles[name] = "norm_bias"
        roles["whiten.bias"] = "stem_bias"
        return roles

    def prepare(self, images: torch.Tensor) -> None:
        """The whitening stem fitted to the first training images (as many as give
        WHITENING_PATCHES patches)."""
        k = self.WHITEN_KERNEL
        per_image = (images.shape[-2] - k + 1) * (images.shape[-1] - k + 1)
        init_whitening(self.whiten, images[:min(len(images), max(1, WHITENING_PATCHES // per_image))])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.gelu(self.whiten(x))
        x = self.pool(self.groups(x)).flatten(1)
        return self.head(x) * self.LOGIT_SCALE


def init_whitening(conv: nn.Conv2d, images: torch.Tensor, eps: float = 5e-4) -> None:
    """Set a conv's filters to the ZCA-style whitening of the images' k x k patches.

    The eigenvectors of the patch covariance, scaled by 1/sqrt(eigenvalue), make the output
    channels decorrelated with unit variance: the first layer starts out already 'trained'.
    """
    k = conv.kernel_size[0]
    c = images.size(1)
    covariance = torch.zeros(c * k * k, c * k * k, dtype=torch.float64, device=images.device)
    count = 0
    for chunk in images.split(WHITENING_CHUNK):  # a chunk's patches at a time, summed in float64
        patches = chunk.float().unfold(2, k, 1).unfold(3, k, 1)  # N, C, H', W', k, k
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * k * k).double()
        covariance += patches.T @ patches
        count += len(patches)
    covariance /= count
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    filters = (eigenvectors.T / torch.sqrt(eigenvalues.clamp_min(0) + eps)[:, None]).flip(0)
    filters = filters.reshape(-1, c, k, k).to(conv.weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(torch.cat([filters, -filters]))


def build_model(arch: str, num_classes: int, shape: tuple[int, int, int]) -> Architecture:
    """`arch` for `num_classes` classes and inputs of `shape` (channels, height, width)."""
    archs = registry()
    if arch not in archs:
        raise ValueError(f"unknown arch {arch!r}; expected one of {list(archs)}")
    module, name = archs[arch].target.split(":")
    return getattr(importlib.import_module(module), name)(num_classes, *shape)


def fresh_model(arch: str, num_classes: int, train_images: torch.Tensor) -> Architecture:
    """A model as training starts it, built for the training images' shape, on their device
    in channels_last, and prepared on them (airbench fits its whitening stem)."""
    model = build_model(arch, num_classes, tuple(train_images.shape[1:]))
    model = model.to(train_images.device, memory_format=torch.channels_last)
    model.prepare(train_images)
    return model
