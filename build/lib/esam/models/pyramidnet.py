"""PyramidNet (Han et al., 2017) for CIFAR: widths grow by alpha/N at every block.

Follows dyhan0920/PyramidNet-PyTorch, which the ESAM authors call as
``PyramidNet('cifar10', 110, 270, num_classes, bottleneck=False)``: basic blocks
without a final ReLU, zero-padded identity shortcuts, 2x2 average pooling on
downsampling. The paper lists PyramidNet-110 (alpha=270) at 28.3M parameters.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from esam.models.registry import register_model
from esam.models.resnet import init_kaiming


class PyramidBlock(nn.Module):
    """BN-conv3x3-BN-ReLU-conv3x3-BN; the shortcut is the input, pooled if strided, zero-padded in channels."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(F.relu(self.bn2(self.conv1(self.bn1(x))))))
        shortcut = F.avg_pool2d(x, 2, ceil_mode=True) if self.stride != 1 else x
        extra = out.shape[1] - shortcut.shape[1]
        if extra:  # parameter-free shortcut: the new channels start at zero
            shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, extra))
        return out + shortcut


class PyramidNet(nn.Module):
    """PyramidNet-``depth`` with basic blocks: 3 stages of (depth-2)/6 blocks, width 16 -> 16+alpha."""

    def __init__(self, depth: int, alpha: float, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"PyramidNet (basic blocks) depth must be 6n+2 (e.g. 110, 272), got {depth}")
        blocks_per_stage = (depth - 2) // 6
        width_step = alpha / (3 * blocks_per_stage)
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, in_planes, width = [], 16, 16.0
        for stage in range(3):
            for j in range(blocks_per_stage):
                width += width_step
                # round() on the running float width, as the reference: widths are not all equal steps.
                layers.append(PyramidBlock(in_planes, int(round(width)), 2 if (stage > 0 and j == 0) else 1))
                in_planes = int(round(width))
        self.layers = nn.Sequential(*layers)
        self.bn_final = nn.BatchNorm2d(in_planes)
        self.fc = nn.Linear(in_planes, num_classes)
        init_kaiming(self)  # the reference's normal(0, sqrt(2 / (k*k*out))) is Kaiming fan_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(self.bn1(self.conv1(x)))  # no ReLU after the stem, as the reference
        out = F.relu(self.bn_final(out))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


@register_model("pyramidnet110")
def pyramidnet110(num_classes: int = 10, in_channels: int = 3, alpha: float = 270) -> nn.Module:
    """PyramidNet-110 with basic blocks, alpha=270 by default (the ESAM paper's CIFAR model)."""
    return PyramidNet(110, alpha, num_classes, in_channels)
