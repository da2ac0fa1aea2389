"""CIFAR-style ResNets (He et al., 2016): 3x3 stem, no max-pool, as in the SAM/ESAM papers' code."""
from __future__ import annotations

from torch import nn
import torch.nn.functional as F

from esam.errors import UserError
from esam.models.registry import register_model


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for small images: widths ``widths``, ``blocks`` BasicBlocks per stage."""

    def __init__(self, blocks: list[int], widths: list[int], num_classes: int, in_channels: int = 3,
                 init: str = "kaiming") -> None:
        super().__init__()
        if init not in INITS:
            raise UserError(f"model.args.init={init!r} is not one of {', '.join(INITS)}")
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers, in_planes = [], widths[0]
        for i, (n, w) in enumerate(zip(blocks, widths)):
            for j in range(n):
                layers.append(BasicBlock(in_planes, w, stride=2 if (i > 0 and j == 0) else 1))
                in_planes = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(in_planes, num_classes)
        if init == "kaiming":
            init_kaiming(self)

    def forward(self, x):
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def init_kaiming(model: nn.Module) -> None:
    """Kaiming-normal convs (fan_out, as torchvision), unit BN, default linear."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# kaiming: Kaiming-normal fan_out convs (torchvision's choice; ours by default).
# pytorch: PyTorch's default layer init, as the ESAM authors' model/resnet.py (no init loop):
# conv weights ~4.6x smaller in norm, so a larger effective lr and relatively stronger rho early.
INITS = ("kaiming", "pytorch")


@register_model("resnet18")
def resnet18(num_classes: int = 10, in_channels: int = 3, init: str = "kaiming") -> nn.Module:
    """CIFAR ResNet-18: 11,173,962 parameters for 10 classes."""
    return CifarResNet([2, 2, 2, 2], [64, 128, 256, 512], num_classes, in_channels, init)


@register_model("resnet_digits", input_size=(1, 8, 8))
def resnet_digits(num_classes: int = 10, in_channels: int = 1, init: str = "kaiming") -> nn.Module:
    """A small ResNet for 8x8 digits (8x8 -> 4x4 -> pooled): fast enough for CPU demos."""
    return CifarResNet([1, 1], [32, 64], num_classes, in_channels, init)
