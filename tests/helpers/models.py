"""Tiny float64 models and seeded batches the optimizer tests share (6 inputs or 2x5x5 images, 3 classes)."""
from __future__ import annotations

import torch
from torch import nn


def mlp(seed: int = 0, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(),
                         nn.Linear(8, 3)).to(dtype)


def convnet(seed: int = 0, dtype=torch.float64) -> nn.Module:
    """With BatchNorm: the passes' running statistics and per-rank batch statistics show."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    ).to(dtype)


MODELS = {"mlp": mlp, "convnet": convnet}


def batch(kind: str, seed: int = 0, n: int = 10, dtype=torch.float64):
    g = torch.Generator().manual_seed(1000 + seed)
    shape = (n, 6) if kind == "mlp" else (n, 2, 5, 5)
    return torch.randn(shape, generator=g, dtype=dtype), torch.randint(3, (n,), generator=g)


def batches(kind: str, steps: int, **kw):
    return [batch(kind, seed=s, **kw) for s in range(steps)]


def weights(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def two_groups(params):
    """Weights with weight decay, biases without: the usual split, and two groups to norm over."""
    params = list(params)
    return [{"params": [p for p in params if p.ndim > 1]},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
