"""The hand-computed float64 reference: torch.autograd.grad on a functional copy of the model
plus a plain torch.optim.SGD; nothing here calls esam.optim."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from helpers.models import two_groups, weights

LR, MOMENTUM, WD, RHO = 0.1, 0.9, 5e-4, 0.05
TIGHT = dict(rtol=1e-10, atol=1e-12)  # float64: only the eps in rho / (||g|| + eps) differs


def assert_all_equal(a, b) -> None:
    assert len(a) == len(b)
    for i, (u, v) in enumerate(zip(a, b)):
        assert torch.equal(u, v), f"tensor {i} differs (max {(u - v).abs().max().item():.3g})"


def assert_all_close(a, b, **tol) -> None:
    assert len(a) == len(b)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, **(tol or TIGHT))


def loss_and_grad(model, ws, x, y):
    """Per-sample losses of ``model`` evaluated at weights ``ws``, and d mean / d ws."""
    names = [n for n, _ in model.named_parameters()]
    leaves = [w.detach().clone().requires_grad_(True) for w in ws]
    out = functional_call(model, dict(zip(names, leaves)), (x,))
    losses = F.cross_entropy(out, y, reduction="none")
    return losses.detach(), list(torch.autograd.grad(losses.mean(), leaves))


def global_norm(ts) -> torch.Tensor:
    return torch.sqrt(sum((t * t).sum() for t in ts))


def sam_perturbation(ws, g, rho, adaptive=False, mask=None, beta=1.0):
    """e = rho g / ||g|| (ASAM: rho w^2 g / || |w| g ||), restricted to ``mask``, over beta."""
    mask = mask or [True] * len(ws)
    scaled = [w.abs() * gi if adaptive else gi for w, gi in zip(ws, g)]
    norm = global_norm([s for s, m in zip(scaled, mask) if m])
    return [(rho * (w.abs() * s if adaptive else s) / (norm * beta)) if m else torch.zeros_like(w)
            for w, s, m in zip(ws, scaled, mask)]


class Reference:
    """A copy of the model's parameters driven by a plain torch.optim.SGD and hand gradients."""

    def __init__(self, model, lr=LR, momentum=MOMENTUM, weight_decay=WD, split=False):
        self.model = copy.deepcopy(model)  # only its structure and BN buffers are used
        self.params = [nn.Parameter(w) for w in weights(model)]
        groups = two_groups(self.params) if split else self.params
        self.base = torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)

    @property
    def ws(self):
        return [p.detach().clone() for p in self.params]

    def step_with(self, grads) -> None:
        for p, g in zip(self.params, grads):
            p.grad = g.clone()
        self.base.step()
