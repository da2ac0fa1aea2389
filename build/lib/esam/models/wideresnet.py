"""Wide ResNet (Zagoruyko & Komodakis, 2016) for CIFAR, pre-activation blocks.

Layout and initialisation follow the ESAM authors' ``model/wideresnet.py`` (itself
xternalz/WideResNet-pytorch): WRN-28-10 has 36,479,194 parameters for 10 classes.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from esam.models.registry import register_model
from esam.models.resnet import init_kaiming


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3, plus the input or its 1x1 projection."""

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.dropout = dropout
        self.projection = None
        if stride != 1 or in_planes != planes:
            self.projection = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(pre)))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        out = self.conv2(out)
        # As in the reference: the projection sees the pre-activated input, identity the raw one.
        shortcut = x if self.projection is None else self.projection(pre)
        return out + shortcut


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor``: three stages of (depth-4)/6 blocks, widths 16k, 32k, 64k."""

    def __init__(self, depth: int, widen_factor: int, num_classes: int, in_channels: int = 3,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4 (e.g. 16, 22, 28, 40), got {depth}")
        blocks_per_stage = (depth - 4) // 6
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        layers, in_planes = [], 16
        for stage, width in enumerate(widths):
            for j in range(blocks_per_stage):
                stride = 2 if (stage > 0 and j == 0) else 1
                layers.append(PreActBlock(in_planes, width, stride, dropout))
                in_planes = width
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(in_planes)  # the last block's output is not yet activated
        self.fc = nn.Linear(in_planes, num_classes)
        init_kaiming(self)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn(self.layers(self.conv1(x))))
        # Adaptive pooling equals the reference's avg_pool2d(8) at 32x32 and allows other sizes.
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


@register_model("wrn28_10")
def wrn28_10(num_classes: int = 10, in_channels: int = 3, dropout: float = 0.0) -> nn.Module:
    """WRN-28-10 with optional dropout between the convs of each block (the paper used 0.3)."""
    return WideResNet(28, 10, num_classes, in_channels, dropout)
