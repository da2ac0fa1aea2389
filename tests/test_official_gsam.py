"""GSAM against the authors' update (juntang-zhuang/GSAM, gsam/gsam.py GSAM.step and
gsam/scheduler.py ProportionScheduler), re-written here in float64 from that source."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from esam.optim import build_optimizer, make_closure
from helpers.official import MODELS, assert_same, batch, bn_layers

LR, MOMENTUM, WD = 0.1, 0.9, 5e-4
EPS = 1e-12  # their perturb_eps default

pytestmark = pytest.mark.usefixtures("one_thread")


class OfficialGSAM:
    """One step as their GSAM.step: g at w; e = rho_t g/(||g|| + eps), w += e; BN momentum 0 for
    the second pass (disable_running_stats); g_s at w + e; gradient_decompose: cos = <g, g_s> /
    (||g_s|| ||g|| + eps), vertical = g - cos ||g|| g_s / (||g_s|| + eps), grad = g_s - alpha
    vertical; w -= e (unperturb, a subtraction); the base SGD step. rho_t as ProportionScheduler:
    rho_min + (rho_max - rho_min)(lr - lr_min)/(lr_max - lr_min), from the lr of this step."""

    def __init__(self, model, *, rho_max, rho_min, alpha, lr_max, lr_min=0.0):
        self.model = copy.deepcopy(model)
        self.base = torch.optim.SGD(self.model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
        self.rho_max, self.rho_min, self.alpha, self.lr_max, self.lr_min = rho_max, rho_min, alpha, lr_max, lr_min

    def rho_t(self) -> float:
        lr = self.base.param_groups[0]["lr"]
        if self.lr_max > self.lr_min:
            return self.rho_min + (self.rho_max - self.rho_min) * (lr - self.lr_min) / (self.lr_max - self.lr_min)
        return self.rho_max

    def _grad(self, x, y) -> None:
        self.base.zero_grad()
        F.cross_entropy(self.model(x), y).backward()

    @staticmethod
    def _norm(ts) -> torch.Tensor:
        return torch.norm(torch.stack([t.norm(p=2) for t in ts]), p=2)

    def step(self, x, y) -> float:
        params = list(self.model.parameters())
        rho = self.rho_t()
        self._grad(x, y)
        with torch.no_grad():
            scale = rho / (self._norm([p.grad for p in params]) + EPS)
            old_g = [p.grad.clone() for p in params]
            e_w = [p.grad * scale for p in params]
            for p, e in zip(params, e_w):
                p.add_(e)
        momenta = [(m, m.momentum) for m in bn_layers(self.model)]
        for m, _ in momenta:
            m.momentum = 0
        self._grad(x, y)
        with torch.no_grad():
            inner = sum((g * p.grad).sum() for g, p in zip(old_g, params))
            new_norm, old_norm = self._norm([p.grad for p in params]), self._norm(old_g)
            cosine = inner / (new_norm * old_norm + EPS)
            for g, p in zip(old_g, params):
                vertical = g - cosine * old_norm * p.grad / (new_norm + EPS)
                p.grad.add_(vertical, alpha=-self.alpha)
            for p, e in zip(params, e_w):
                p.sub_(e)
        self.base.step()
        for m, mom in momenta:
            m.momentum = mom
        return rho


def cosine_lr(t: int, steps: int) -> float:
    return LR * 0.5 * (1 + math.cos(math.pi * t / steps))


@pytest.mark.parametrize("kind", ["mlp", "convnet"])
@pytest.mark.parametrize("rho_max,rho_min,alpha", [(0.05, 0.02, 0.01), (0.05, 0.05, 0.01), (0.2, 0.1, 0.4)],
                         ids=["imagenet-like", "constant-rho", "large-alpha"])
def test_gsam_equals_the_official_update_and_rho_schedule(kind, rho_max, rho_min, alpha):
    model = MODELS[kind]()
    theirs = OfficialGSAM(model, rho_max=rho_max, rho_min=rho_min, alpha=alpha, lr_max=LR)
    opt = build_optimizer("gsam", model.parameters(), base_optimizer="sgd", lr=LR, momentum=MOMENTUM,
                          weight_decay=WD, rho=rho_max, rho_min=rho_min, alpha=alpha, lr_min=0.0, model=model)
    steps = 6
    for t in range(steps):
        lr = cosine_lr(t, steps)
        for group in (*opt.param_groups, *theirs.base.param_groups):
            group["lr"] = lr
        x, y = batch(kind, t)
        rho_theirs = theirs.step(x, y)
        opt.step(make_closure(model, x, y))
        assert float(opt.last_stats["rho"]) == pytest.approx(rho_theirs, rel=1e-14)
        assert_same(model, theirs.model)  # weights and BN running statistics
    assert rho_min == rho_max or float(opt.last_stats["rho"]) < rho_max - 1e-6  # the schedule moved rho
