"""Shared pieces of the tests/test_official_*.py cross-checks: tiny float64 models and batches,
and the comparison. Each test module re-writes one official update from its published source
(never importing or vendoring that code) and drives our optimizer only through esam.optim's
public API: build_optimizer, make_closure, step(closure), param_groups, evaluation_weights()."""
from __future__ import annotations

import torch
from torch import nn

TIGHT = dict(rtol=1e-10, atol=1e-12)  # float64: only where each side puts its eps differs


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def convnet(seed: int = 0) -> nn.Module:
    """With BatchNorm, so that which pass updates the running statistics matters."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).double()


MODELS = {"mlp": mlp, "convnet": convnet}


def batch(kind: str, seed: int, n: int = 12):
    g = torch.Generator().manual_seed(2000 + seed)
    shape = (n, 6) if kind == "mlp" else (n, 2, 5, 5)
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randint(3, (n,), generator=g)


def state(model: nn.Module) -> list[torch.Tensor]:
    """Parameters and floating-point buffers (BN running statistics), detached copies."""
    return [t.detach().clone() for t in model.parameters()] + \
           [b.detach().clone() for b in model.buffers() if b.is_floating_point()]


def assert_same(ours: nn.Module, theirs: nn.Module, **tol) -> None:
    a, b = state(ours), state(theirs)
    assert len(a) == len(b)
    for i, (u, v) in enumerate(zip(a, b)):
        torch.testing.assert_close(u, v, **(tol or TIGHT), msg=lambda m: f"tensor {i}: {m}")


def max_diff(ours: nn.Module, theirs: nn.Module) -> float:
    return max((u - v).abs().max().item() for u, v in zip(state(ours), state(theirs)))


def bn_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
