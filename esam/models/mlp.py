"""A plain MLP (flatten -> [Linear, ReLU] x depth -> Linear): the leaderboard's CPU-scale model,
where a run must take seconds on one core (digits 8x8, MNIST-1D's 40-sample signals)."""
from __future__ import annotations

from torch import nn

from esam.errors import UserError
from esam.models.registry import register_model


@register_model("mlp", input_size=(1, 8, 8))
def mlp(num_classes: int = 10, in_channels: int = 1, width: int = 256, depth: int = 2,
        input_size: int = 64) -> nn.Module:
    """``depth`` hidden layers of ``width`` units on the flattened input of ``input_size`` values
    (C x H x W: 64 for digits, 40 for MNIST-1D; it cannot be read from the data builder here)."""
    if width < 1 or depth < 1 or input_size < 1:
        raise UserError(f"model.args: width={width}, depth={depth} and input_size={input_size} must be >= 1")
    layers: list[nn.Module] = [nn.Flatten()]
    fan_in = input_size
    for _ in range(depth):
        layers += [nn.Linear(fan_in, width), nn.ReLU()]
        fan_in = width
    layers.append(nn.Linear(fan_in, num_classes))
    return nn.Sequential(*layers)
