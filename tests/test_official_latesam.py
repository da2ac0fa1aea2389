"""Late-phase SAM against the authors' loop (zzp1012/SAM-in-Late-Phase, script/ERM_to_SAM.py with
src/utils/SAM.py), re-written here in float64: SGD steps until epoch start_SAM, then SAM steps.

Their loop builds two optimizers over the same parameters, an ``ERM_optimizer`` (SGD) and a
``SAM_optimizer`` whose own SGD has its own momentum buffers, so the SAM phase starts with fresh
momentum. Ours is one optimizer whose momentum runs through the switch. The test shows both: our
run equals their loop with the momentum carried over, and differs from theirs after the switch."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from esam.optim import build_optimizer, make_closure
from helpers.official import MODELS, assert_same, batch, bn_layers, max_diff

LR, MOMENTUM, WD, RHO = 0.1, 0.9, 5e-4, 0.05
EPOCHS, START, STEPS = 4, 2, 3  # SAM from epoch 2 of 4 (start = 0.5), 3 steps per epoch

pytestmark = pytest.mark.usefixtures("one_thread")


class AuthorsLoop:
    """ERM steps: forward (BN tracking), backward, SGD step. SAM steps (their SAM.first_step /
    second_step, davda54/sam's rule): e = rho g / (||g|| + 1e-12), w += e; second pass with BN
    momentum 0 (disable_running_stats); w <- the saved w; the SAM optimizer's own SGD step."""

    def __init__(self, model, *, fresh_momentum: bool):
        self.model = copy.deepcopy(model)
        params = list(self.model.parameters())
        self.erm = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WD)
        self.sam_base = (torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WD)
                         if fresh_momentum else self.erm)

    def _loss(self, x, y):
        return F.cross_entropy(self.model(x), y)

    def step(self, x, y, epoch: int) -> None:
        params = list(self.model.parameters())
        if epoch < START:
            self.erm.zero_grad()
            self._loss(x, y).backward()
            self.erm.step()
            return
        self.sam_base.zero_grad()
        self._loss(x, y).backward()
        with torch.no_grad():
            norm = torch.norm(torch.stack([p.grad.norm(p=2) for p in params]), p=2)
            scale = RHO / (norm + 1e-12)
            old = [p.detach().clone() for p in params]
            for p in params:
                p.add_(p.grad * scale)
        self.sam_base.zero_grad()
        momenta = [(m, m.momentum) for m in bn_layers(self.model)]
        for m, _ in momenta:
            m.momentum = 0
        self._loss(x, y).backward()
        for m, mom in momenta:
            m.momentum = mom
        with torch.no_grad():
            for p, w in zip(params, old):
                p.copy_(w)
        self.sam_base.step()


@pytest.mark.parametrize("kind", ["mlp", "convnet"])
def test_late_phase_sam_equals_the_authors_loop_but_for_the_fresh_momentum(kind):
    model = MODELS[kind]()
    carried, theirs = AuthorsLoop(model, fresh_momentum=False), AuthorsLoop(model, fresh_momentum=True)
    opt = build_optimizer("latesam", model.parameters(), base_optimizer="sgd", lr=LR, momentum=MOMENTUM,
                          weight_decay=WD, rho=RHO, start=START / EPOCHS, model=model)
    for epoch in range(EPOCHS):
        for i in range(STEPS):
            x, y = batch(kind, epoch * STEPS + i)
            carried.step(x, y, epoch)
            theirs.step(x, y, epoch)
            opt.set_progress(epoch + i / STEPS, EPOCHS)
            opt.step(make_closure(model, x, y))
            assert float(opt.last_stats["sam_step"]) == float(epoch >= START)
            assert_same(model, carried.model)
            if epoch < START:
                assert_same(model, theirs.model)  # identical up to the switch
    assert max_diff(model, theirs.model) > 1e-4  # their SAM phase restarts the momentum
