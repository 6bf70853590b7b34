"""torchvision's ResNet-18 as two architectures: with a CIFAR stem, and as it is for photos
and ImageNet weights. Their own module because torchvision takes a second to import, which
the other architectures' stages need not pay."""
from __future__ import annotations

import torchvision
from torch import nn

from stages.lib.archs import architecture
from stages.lib.nets import Architecture, as_conv3x3


@architecture("resnet18", any_size=True)
class ResNet18(torchvision.models.ResNet, Architecture):
    """torchvision's ResNet-18 with a CIFAR stem (3x3 conv, stride 1, no max-pool) for any
    channel count; its average pool is adaptive, so any size from 8x8 up works.

    Key names are torchvision's, so ImageNet weights load by name; only `conv1` (7x7 and RGB
    there) and `fc` (1000 classes there) differ in shape and are re-initialised when finetuning.
    """

    HEAD = "fc."
    STEM = ("conv1.weight",)

    def __init__(self, num_classes: int, channels: int, height: int, width: int) -> None:
        super().__init__(torchvision.models.resnet.BasicBlock, [2, 2, 2, 2], num_classes=num_classes)
        self.conv1 = nn.Conv2d(channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.maxpool = nn.Identity()
        # layer4's 3x3 convs train on 4x4 maps at 32 px: the small-map path of Conv3x3
        blocks = [m for m in self.modules() if isinstance(m, torchvision.models.resnet.BasicBlock)]
        for block in blocks:  # a list first: the loop replaces modules
            if block.conv1.stride == (1, 1):
                block.conv1 = as_conv3x3(block.conv1)
            block.conv2 = as_conv3x3(block.conv2)  # always stride 1


@architecture("resnet18_imagenet", any_size=True)
class ResNet18ImageNet(torchvision.models.ResNet, Architecture):
    """torchvision's ResNet-18 as it is, ImageNet stem included (7x7 conv, stride 2, then a
    max-pool: a quarter of the side before the first block), for photos at 96 px and more. An
    ImageNet checkpoint loads whole, stem too; only `fc` is re-initialised for the classes
    (and `conv1` for 1-channel data)."""

    HEAD = "fc."
    STEM = ("conv1.weight",)

    def __init__(self, num_classes: int, channels: int, height: int, width: int) -> None:
        super().__init__(torchvision.models.resnet.BasicBlock, [2, 2, 2, 2], num_classes=num_classes)
        if channels != 3:
            self.conv1 = nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
