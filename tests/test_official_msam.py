"""MSAM against the authors' optimizer (MarlonBecker/MSAM, optimizer/msam.py MSAM.step,
move_up_to_momentumAscent, move_back_from_momentumAscent), re-written here in float64."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from esam.optim import build_optimizer, make_closure
from helpers.official import MODELS, assert_same, batch, max_diff

LR, MOMENTUM, RHO = 0.1, 0.9, 0.3

pytestmark = pytest.mark.usefixtures("one_thread")


class OfficialMSAM:
    """Their MSAM: momentum buffers start at zero and ``inverse_norm`` at 0; the model holds
    w~ = w - rho v / ||v|| between steps. One step, per tensor, on the gradient d taken at w~:
    d += wd * w~ (their L2 decay, at the perturbed weights); w~ += rho inv v (back to w);
    v = mu v + d; w -= lr v; then inv = 1 / (||v|| + 1e-12) over all buffers and w -= rho inv v.
    ``move_back`` (before their test) adds rho inv v back."""

    def __init__(self, model, weight_decay: float, decay_at_w: bool = False):
        self.model = copy.deepcopy(model)
        self.params = list(self.model.parameters())
        self.bufs = [torch.zeros_like(p) for p in self.params]
        self.inv, self.wd = 0.0, weight_decay
        self.decay_at_w = decay_at_w  # not theirs: the decay taken at w = w~ + rho inv v (ours)

    @torch.no_grad()
    def step(self, x, y) -> None:
        with torch.enable_grad():
            for p in self.params:
                p.grad = None
            F.cross_entropy(self.model(x), y).backward()
        for p, buf in zip(self.params, self.bufs):
            d = p.grad
            if self.wd != 0:
                d.add_(p + RHO * self.inv * buf if self.decay_at_w else p, alpha=self.wd)
            p.add_(buf, alpha=RHO * self.inv)
            buf.mul_(MOMENTUM).add_(d)
            p.add_(buf, alpha=-LR)
        self.inv = 1 / (torch.norm(torch.stack([b.norm(p=2) for b in self.bufs]), p=2) + 1e-12)
        for p, buf in zip(self.params, self.bufs):
            p.sub_(buf, alpha=RHO * self.inv)

    @torch.no_grad()
    def moved_back(self):
        model = copy.deepcopy(self.model)
        for p, buf in zip(model.parameters(), self.bufs):
            p.add_(buf, alpha=RHO * self.inv)
        return model


def make(model, weight_decay):
    return build_optimizer("msam", model.parameters(), base_optimizer="sgd", lr=LR, momentum=MOMENTUM,
                           weight_decay=weight_decay, rho=RHO, model=model)


@pytest.mark.parametrize("kind", ["mlp", "convnet"])
def test_msam_equals_the_official_optimizer_without_weight_decay(kind):
    model = MODELS[kind]()
    theirs, opt = OfficialMSAM(model, weight_decay=0.0), make(model, 0.0)
    for t in range(6):
        x, y = batch(kind, t)
        theirs.step(x, y)
        opt.step(make_closure(model, x, y))
        assert_same(model, theirs.model)  # the perturbed weights w~ both hold between steps
        with opt.evaluation_weights():    # and the weights both evaluate
            assert_same(model, theirs.moved_back())


def test_with_weight_decay_the_one_difference_is_where_the_decay_is_taken():
    """Ours decays at w (our SAM's convention), theirs at w~: the runs part, and their step with
    the decay moved to w is ours again. The documented difference (esam/optim/msam.py)."""
    wd = 5e-3
    model = MODELS["mlp"]()
    opt = make(model, wd)
    theirs, moved = OfficialMSAM(model, wd), OfficialMSAM(model, wd, decay_at_w=True)
    for t in range(6):
        x, y = batch("mlp", t)
        theirs.step(x, y)
        moved.step(x, y)
        opt.step(make_closure(model, x, y))
        assert_same(model, moved.model)
    assert max_diff(model, theirs.model) > 1e-7
