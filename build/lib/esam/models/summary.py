"""Parameter and FLOP counts of every registered model, as a Markdown table."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from esam.models.registry import MODELS, NATIVE_SHAPES, build_model, count_parameters


@dataclass
class ModelStats:
    name: str
    input_size: tuple[int, int, int]
    num_classes: int
    parameters: int
    flops: int  # forward pass of one image; 2 per multiply-add, as FlopCounterMode counts


def measure(name: str) -> ModelStats:
    """Build ``name`` at its native shape and count its parameters and one image's forward FLOPs."""
    shape = NATIVE_SHAPES[name]
    torch.manual_seed(0)
    model = build_model(name, num_classes=shape.num_classes, in_channels=shape.input_size[0]).eval()
    # FlopCounterMode counts convolutions and matmuls only; the elementwise ops it skips
    # (BN, ReLU, pooling) are a small share of these nets' work.
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, *shape.input_size))
    return ModelStats(name, shape.input_size, shape.num_classes, count_parameters(model),
                      counter.get_total_flops())


def model_table(names: list[str] | None = None) -> str:
    """A Markdown table of parameters and per-image forward FLOPs of ``names`` (default: all models)."""
    rows = [
        "| model | input (C×H×W) | classes | parameters | GFLOPs / image | GMACs / image |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name in names or sorted(MODELS):
        s = measure(name)
        rows.append(
            f"| {s.name} | {'×'.join(map(str, s.input_size))} | {s.num_classes} | {s.parameters:,} "
            f"| {s.flops / 1e9:.3f} | {s.flops / 2e9:.3f} |"
        )
    return "\n".join(rows)
