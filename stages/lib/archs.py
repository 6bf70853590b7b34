"""The architectures `train.arch` may name: for each, the "module:class" that builds it and
what params must know of it before torch is imported, to refuse knobs that do not suit it in
one message (params.arch_problems). model.build_model imports only the module it needs.

Adding an architecture: its class (an nets.Architecture) in any module, and one entry here."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Arch:
    target: str  # "module:Class"
    any_size: bool = False  # trains on any image size from 16x16 up: progressive resizing needs it
    # the key prefixes of its blocks from the input on: progressive freezing stops them in turn
    blocks: tuple[str, ...] = ()


ARCHS = {
    "airbench": Arch("stages.lib.nets:AirbenchNet", any_size=True,
                     blocks=("groups.0.", "groups.1.", "groups.2.")),  # the stem's bias stops on its own
    "lenet": Arch("stages.lib.nets:LeNet", blocks=("conv1.", "conv2.", "fc1.", "fc2.")),
    "resnet18": Arch("stages.lib.resnets:ResNet18", any_size=True),
    "resnet18_imagenet": Arch("stages.lib.resnets:ResNet18ImageNet", any_size=True),
    "mlp": Arch("stages.lib.nets:QuickstartMLP"),
    "mnist_mlp": Arch("stages.lib.nets:MnistMLP"),
}
