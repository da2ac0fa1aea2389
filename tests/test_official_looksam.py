"""LookSAM against the only public code by a paper's authors we could find: the MSAM authors'
LookSAM (MarlonBecker/MSAM, optimizer/looksam.py), re-written here in float64. The LookSAM
authors (Liu et al., CVPR 2022) published no code."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from esam.optim import build_optimizer, make_closure
from helpers.official import MODELS, assert_same, batch, bn_layers

LR, MOMENTUM, WD, RHO = 0.1, 0.9, 5e-4, 0.05
# Ours divides by ||g_v|| + 1e-12, theirs normalises g_v exactly; ||g_v|| is small (g_s is mostly
# along g), so the 1e-12 shows at ~1e-9 relative after a few reuse steps.
LOOSE = dict(rtol=1e-8, atol=1e-11)

pytestmark = pytest.mark.usefixtures("one_thread")


class OfficialLookSAM:
    """Their step: g at w (BN tracking on). Every k-th step (their counter starts at k, so step 0
    is one): e = rho g / (||g|| + 1e-12), w += e; g_s at w + e with BN tracking off; w -= e;
    g_v = g_s - <g_s, g> / (||g||^2 + 1e-12) g, normalised to unit norm; the SGD step on g_s.
    Other steps: grad = g + alpha ||g|| g_v_unit, then the SGD step (torch's rule: decay added
    to the gradient, momentum, w -= lr buf)."""

    def __init__(self, model, *, k: int, alpha: float):
        self.model = copy.deepcopy(model)
        self.params = list(self.model.parameters())
        self.base = torch.optim.SGD(self.params, lr=LR, momentum=MOMENTUM, weight_decay=WD)
        self.k, self.alpha, self.counter = k, alpha, k
        self.gv_unit: list[torch.Tensor] | None = None

    @staticmethod
    def _norm(ts) -> torch.Tensor:
        return torch.norm(torch.stack([t.norm(p=2) for t in ts]), p=2)

    def _grad(self, x, y) -> None:
        self.base.zero_grad()
        F.cross_entropy(self.model(x), y).backward()

    def step(self, x, y) -> bool:
        self._grad(x, y)
        sam = self.counter == self.k
        if sam:
            self.counter = 0
            with torch.no_grad():
                g = [p.grad.clone() for p in self.params]
                scale = RHO / (self._norm(g) + 1e-12)
                e_w = [gi * scale for gi in g]
                for p, e in zip(self.params, e_w):
                    p.add_(e)
            for m in bn_layers(self.model):
                m.track_running_stats = False  # their setBatchNormTracking(False)
            self._grad(x, y)
            for m in bn_layers(self.model):
                m.track_running_stats = True
            with torch.no_grad():
                dot = sum((p.grad * gi).sum() for p, gi in zip(self.params, g))
                gnorm = self._norm(g)
                for p, e in zip(self.params, e_w):
                    p.sub_(e)
                gv = [p.grad - dot / (gnorm ** 2 + 1e-12) * gi for p, gi in zip(self.params, g)]
                gv_norm = self._norm(gv)
                self.gv_unit = [v / gv_norm for v in gv]
        else:
            with torch.no_grad():
                gnorm = self._norm([p.grad for p in self.params])
                for p, v in zip(self.params, self.gv_unit):
                    p.grad.add_(v, alpha=self.alpha * float(gnorm))
        self.base.step()
        self.counter += 1
        return sam


@pytest.mark.parametrize("kind", ["mlp", "convnet"])
@pytest.mark.parametrize("k,alpha", [(3, 0.7), (5, 0.2)])
def test_looksam_equals_the_msam_authors_looksam(kind, k, alpha):
    model = MODELS[kind]()
    theirs = OfficialLookSAM(model, k=k, alpha=alpha)
    opt = build_optimizer("looksam", model.parameters(), base_optimizer="sgd", lr=LR, momentum=MOMENTUM,
                          weight_decay=WD, rho=RHO, k=k, alpha=alpha, model=model)
    for t in range(2 * k + 2):  # three SAM steps and the reuse steps between them
        x, y = batch(kind, t)
        sam = theirs.step(x, y)
        opt.step(make_closure(model, x, y))
        assert float(opt.last_stats["sam_step"]) == float(sam) == float(t % k == 0)
        assert_same(model, theirs.model, **LOOSE)
