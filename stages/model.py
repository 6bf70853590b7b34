"""The architectures, by name: `airbench` (fast default), `lenet` (tutorial), `resnet18`.

Each model names its classifier head in `HEAD` (a key prefix), which finetune re-initialises
and trains at its own learning rate.
"""
from __future__ import annotations

import io
import json
import pickle
import zipfile
from pathlib import Path

import torch
import torchvision
from torch import nn

from stages.outputs import StageError, atomic_dir

ARCHS = ("airbench", "lenet", "resnet18")
WHITENING_IMAGES = 5000  # airbench: enough patches for a stable 12x12 covariance


class LeNet(nn.Module):
    """The 60-minute-blitz network for 3x32x32 images."""

    HEAD = "fc3."

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class ResNet18(torchvision.models.ResNet):
    """torchvision's ResNet-18 with a CIFAR stem (3x3 conv, stride 1, no max-pool).

    Key names are torchvision's, so ImageNet weights load by name; only `conv1` (7x7 there)
    and `fc` (1000 classes there) differ in shape and are re-initialised when finetuning.
    """

    HEAD = "fc."
    STEM = ("conv1.weight",)  # may be re-initialised when its shape differs (ImageNet's 7x7)

    def __init__(self, num_classes: int) -> None:
        super().__init__(torchvision.models.resnet.BasicBlock, [2, 2, 2, 2], num_classes=num_classes)
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.maxpool = nn.Identity()


class FrozenScaleBatchNorm(nn.BatchNorm2d):
    """BatchNorm whose scale stays 1 (airbench): the following conv can absorb any scale,
    and the bias alone trains, at a much higher learning rate (see loop.param_groups)."""

    def __init__(self, num_features: int) -> None:
        # momentum 0.4 = airbench's 0.6 in its convention; tiny eps as there.
        super().__init__(num_features, eps=1e-12, momentum=0.4)
        self.weight.requires_grad_(False)


class DiracConv(nn.Conv2d):
    """3x3 'same' conv initialised partly to the identity: an implicit residual path that
    lets a plain (skip-free) stack train fast from the first step."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size=3, padding="same", bias=False)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        nn.init.dirac_(self.weight.data[: self.in_channels])


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


class AirbenchNet(nn.Module):
    """airbench94's network: frozen patch-whitening stem, three conv groups (64/256/256),
    global max-pool, a bias-free linear head scaled by 1/9 (keeps initial logits small)."""

    HEAD = "head."
    WHITEN_KERNEL = 2
    WIDTHS = (64, 256, 256)
    LOGIT_SCALE = 1 / 9

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        # Twice the patch dimension: each whitening filter is kept with its negation so that
        # GELU after it loses no information.
        whiten_width = 2 * 3 * self.WHITEN_KERNEL ** 2
        self.whiten = nn.Conv2d(3, whiten_width, kernel_size=self.WHITEN_KERNEL, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)
        nn.init.zeros_(self.whiten.bias)
        widths = (whiten_width, *self.WIDTHS)
        self.groups = nn.Sequential(*(ConvGroup(a, b) for a, b in zip(widths, widths[1:])))
        self.pool = nn.MaxPool2d(3)
        self.head = nn.Linear(widths[-1], num_classes, bias=False)

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
    patches = images.float().unfold(2, k, 1).unfold(3, k, 1)  # N, C, H', W', k, k
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * k * k).double()
    covariance = patches.T @ patches / len(patches)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    filters = (eigenvectors.T / torch.sqrt(eigenvalues.clamp_min(0) + eps)[:, None]).flip(0)
    filters = filters.reshape(-1, c, k, k).to(conv.weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(torch.cat([filters, -filters]))


def fresh_model(arch: str, num_classes: int, train_images: torch.Tensor) -> nn.Module:
    """A model as training starts it, on the images' device in channels_last; airbench's
    whitening stem fitted to the first training images."""
    model = build_model(arch, num_classes).to(train_images.device, memory_format=torch.channels_last)
    if isinstance(model, AirbenchNet):
        init_whitening(model.whiten, train_images[:WHITENING_IMAGES])
    return model


def build_model(arch: str, num_classes: int) -> nn.Module:
    if arch == "airbench":
        return AirbenchNet(num_classes)
    if arch == "lenet":
        return LeNet(num_classes)
    if arch == "resnet18":
        return ResNet18(num_classes)
    raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")


def torch_bytes(obj: object) -> bytes:
    """torch.save into memory: written by Python, a full disk raises a plain OSError (torch's
    own file writer reports it as an opaque RuntimeError)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def save_model(model: nn.Module, model_dir: Path, sidecar: dict) -> None:
    """model.pt (a plain state_dict on the CPU) and model.json (arch, classes, normalization,
    input_size, params, metrics), written together as one directory."""
    state_dict = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_dir(model_dir) as tmp:
        (tmp / "model.pt").write_bytes(torch_bytes(state_dict))
        (tmp / "model.json").write_text(json.dumps(sidecar, indent=2) + "\n")


def load_weights(path: Path, map_location: str | torch.device = "cpu") -> object:
    """torch.load restricted to tensors and plain containers (weights_only=True): a file that
    carries code is refused, never run. Every failure names the file."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise StageError(f"{path}: does not exist") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError,
            zipfile.BadZipFile) as err:
        lines = str(err).strip().splitlines() or [type(err).__name__]
        reason = next((ln.strip() for ln in lines if "WeightsUnpickler error" in ln), lines[0])
        raise StageError(f"{path}: not a loadable weights-only torch file ({reason}); it is "
                         "truncated, not a torch file, or holds code, which is never run") from None


def load_trained(model_dir: Path) -> tuple[nn.Module, dict]:
    """Rebuild a saved model on the CPU from its directory; returns (model, sidecar)."""
    try:
        sidecar = json.loads((model_dir / "model.json").read_text())
        arch, classes, size = sidecar["arch"], sidecar["classes"], sidecar["input_size"]
        if len(size) != 2 or not all(isinstance(n, int) and n > 0 for n in size):
            raise ValueError(f"input_size must be [height, width], found {size}")
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise StageError(f"{model_dir / 'model.json'}: cannot read the model's sidecar ({err}); "
                         "rerun the stage that wrote it") from None
    if arch not in ARCHS:
        raise StageError(f"{model_dir / 'model.json'}: unknown arch {arch!r}; expected one of {ARCHS}")
    model = build_model(arch, len(classes))
    state_dict = load_weights(model_dir / "model.pt")
    try:
        model.load_state_dict(state_dict, strict=True)
    except (RuntimeError, TypeError, AttributeError) as err:
        raise StageError(f"{model_dir / 'model.pt'}: cannot load it as a {arch} state_dict for "
                         f"{len(classes)} classes ({str(err).splitlines()[0]})") from None
    return model.eval(), sidecar
