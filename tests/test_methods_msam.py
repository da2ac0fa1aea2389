"""MSAM (Becker et al., 2024) against its update computed by hand in float64, and its stored
perturbed weights: evaluation moves them back exactly, checkpoints resume bit for bit."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from esam.optim import METHODS, MSAM
from helpers import CountingClosure, FakeDDP, save_load, train_digits
from helpers import (LR, MOMENTUM, WD, assert_all_close, assert_all_equal, batch, batches, convnet,
                     loss_and_grad, mlp, two_groups, weights)

RHO_M = 0.3  # large enough that the perturbation shows, small enough for a tiny model
KW = dict(lr=LR, momentum=MOMENTUM, weight_decay=WD)


pytestmark = pytest.mark.usefixtures("one_thread")


class MomentumReference:
    """The iterate w in float64, stepped by a plain torch optimizer on hand gradients taken at
    w - rho v/||v|| (v = that optimizer's momentum): the paper's Algorithm, weights never perturbed."""

    def __init__(self, model, base: str, rho: float, eps: float = 1e-12, split: bool = False):
        self.model, self.rho, self.eps = copy.deepcopy(model), rho, eps
        self.params = [nn.Parameter(w) for w in weights(model)]
        groups = two_groups(self.params) if split else self.params
        if base == "sgd":
            self.base, self.key = torch.optim.SGD(groups, **KW), "momentum_buffer"
        else:
            self.base, self.key = torch.optim.AdamW(groups, lr=1e-2, weight_decay=WD), "exp_avg"

    @property
    def w(self):
        return [p.detach().clone() for p in self.params]

    def forward_point(self):
        if not self.base.state:
            return self.w
        v = [self.base.state[p][self.key] for p in self.params]
        norm = torch.sqrt(sum((vi * vi).sum() for vi in v))
        return [wi - self.rho * vi / (norm + self.eps) for wi, vi in zip(self.w, v)]

    def step(self, x, y):
        losses, g = loss_and_grad(self.model, self.forward_point(), x, y)
        for p, gi in zip(self.params, g):
            p.grad = gi
        self.base.step()
        return losses


def make(net, base="sgd", rho=RHO_M, params=None, **kw):
    base_kw = KW if base == "sgd" else dict(lr=1e-2, weight_decay=WD)
    return MSAM(net.parameters() if params is None else params, base, rho=rho, **{**base_kw, **kw})


@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("split", [False, True], ids=["one_group", "two_groups"])
def test_matches_hand_computed_update(base, split):
    model = mlp()
    ref = MomentumReference(model, base, RHO_M, split=split)
    opt = make(model, base, params=two_groups(model.parameters()) if split else None)
    for t, (x, y) in enumerate(batches("mlp", 5)):
        closure = CountingClosure(model, x, y)
        w_hat = ref.forward_point()
        losses = ref.step(x, y)
        out = opt.step(closure)
        assert closure.passes == (1, 1) and opt.last_cost == 3.0  # one forward, one backward
        if t == 0:
            assert_all_equal(closure.seen[0], weights(mlp()))  # no momentum yet: the step runs at w_0
        assert_all_close(closure.seen[0], w_hat)  # the gradient was taken at w - rho v/||v||
        torch.testing.assert_close(out, losses, rtol=1e-10, atol=1e-12)
        assert_all_close(weights(model), ref.forward_point())  # stored perturbed for the next step
        with opt.evaluation_weights():
            assert_all_close(weights(model), ref.w)  # evaluated at the iterate itself
        assert max((a - b).abs().max() for a, b in zip(weights(model), ref.w)) > 1e-3


def test_evaluation_weights_restore_exactly_and_are_where_the_next_step_steps_from():
    model = convnet()
    opt = make(model, model=model)
    for x, y in batches("convnet", 3):
        opt.step(CountingClosure(model, x, y))
    perturbed = weights(model)
    with opt.evaluation_weights():
        w = weights(model)
        with opt.evaluation_weights():  # nested: nothing moves twice
            assert_all_equal(weights(model), w)
        with pytest.raises(RuntimeError, match="evaluation_weights"):
            opt.step(CountingClosure(model, *batch("convnet")))
    assert_all_equal(weights(model), perturbed)  # by copy: w - c v + c v would not be exact
    assert any(not torch.equal(a, b) for a, b in zip(w, perturbed))

    # A scheduler changing rho between steps does not change where the weights move back to.
    opt.param_groups[0]["rho"] = 5.0
    with opt.evaluation_weights():
        assert_all_equal(weights(model), w)
    opt.param_groups[0]["rho"] = RHO_M
    # The next step moves back to exactly the evaluated w before its base update.
    at_base_update = []
    opt.phase_hook = lambda phase: at_base_update.append(weights(model)) if phase == "base_update" else None
    opt.step(CountingClosure(model, *batch("convnet", seed=7)))
    assert len(at_base_update) == 1
    assert_all_equal(at_base_update[0], w)


@pytest.mark.parametrize("inside_evaluation", [True, False], ids=["as_the_trainer_saves", "bare"])
@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_checkpoint_resume_equals_straight_run_bit_for_bit(inside_evaluation, base):
    data = batches("convnet", 6)
    model = convnet()
    opt = make(model, base, model=model)
    for x, y in data[:3]:
        opt.step(CountingClosure(model, x, y))
    saved = save_load(model, opt, inside_evaluation=inside_evaluation)
    if inside_evaluation:  # the checkpoint's model holds w, the optimizer the perturbed weights
        with opt.evaluation_weights():
            assert_all_equal(list(saved["model"].values())[:2], weights(model)[:2])
    for x, y in data[3:]:
        opt.step(CountingClosure(model, x, y))

    def resume(with_msam_state: bool):
        fresh = convnet(seed=1)
        fresh.load_state_dict(saved["model"])  # the model first, then the optimizer
        fresh_opt = make(fresh, base, model=fresh)
        state = copy.deepcopy(saved["opt"])
        if not with_msam_state:
            state["extra"].pop("msam")
        fresh_opt.load_state_dict(state)
        for x, y in data[3:]:
            fresh_opt.step(CountingClosure(fresh, x, y))
        return fresh

    resumed = resume(True)
    assert_all_equal(weights(resumed), weights(model))
    assert_all_equal(list(resumed.buffers()), list(model.buffers()))
    # Without the saved perturbed weights and scales the run differs: the check above bites.
    assert any(not torch.equal(a, b) for a, b in zip(weights(resume(False)), weights(model)))


def test_single_pass_all_reduces_under_ddp():
    """The one backward is the update's gradient: it must not run under no_sync."""
    model = FakeDDP(*mlp())
    seen = []
    opt = make(model, model=model)
    for x, y in batches("mlp", 2):
        inner = CountingClosure(model, x, y)
        opt.step(lambda indices=None: (seen.append(model.syncing), inner(indices))[1])
    assert seen == [True, True]


def test_registered_cost_is_one_sgd_step():
    assert METHODS["msam"].expected_cost() == 3.0 and METHODS["msam"].relative_cost() == 1.0


@pytest.mark.parametrize("make_opt,key", [
    (lambda ps: MSAM(ps, "sgd", rho=-1.0, lr=LR, momentum=0.9), "rho"),
    (lambda ps: MSAM(ps, "sgd", rho=float("nan"), lr=LR, momentum=0.9), "rho"),
    (lambda ps: MSAM(ps, "sgd", eps=-1.0, lr=LR, momentum=0.9), "eps"),
    (lambda ps: MSAM(ps, "sgd", lr=LR), "momentum"),  # torch SGD's default momentum is 0
    (lambda ps: MSAM(ps, "rmsprop", lr=LR, momentum=0.0), "momentum"),
    (lambda ps: MSAM(ps, torch.optim.Adagrad, lr=LR), "momentum"),
    (lambda ps: MSAM(ps, "sgdd", lr=LR), "base optimizer"),
])
def test_bad_arguments_raise_value_error_naming_them(make_opt, key):
    with pytest.raises(ValueError, match=key):
        make_opt(mlp().parameters())


def test_trains_through_the_shared_trainer_and_checkpoints_the_moved_back_weights(tmp_path):
    out = tmp_path / "run"
    rows = train_digits("msam", out)
    assert rows[-1]["test_acc"] > 0
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=False)
    held = ckpt["optimizer"]["extra"]["msam"]["perturbed_weights"]
    params = [v for k, v in ckpt["model"].items() if k.endswith(("weight", "bias"))]
    assert held and all(torch.isfinite(w).all() for w in held.values())
    assert any(not torch.equal(held[i], p) for i, p in enumerate(params) if i in held)


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_grad_scaler_step_equals_unscaled_step(base):
    from helpers import scaled_equals_unscaled

    scaled_equals_unscaled(lambda m: make(m, base), mlp, batches("mlp", 4))


def test_best_checkpoint_holds_the_evaluated_moved_back_weights(tmp_path):
    """best.pt is what was evaluated: MSAM's weights moved back, not the perturbed ones it trains at."""
    out = tmp_path / "run"
    train_digits("msam", out)
    best = torch.load(out / "checkpoints" / "best.pt", weights_only=False)["model"]
    last = torch.load(out / "checkpoints" / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(best[k], last[k]) for k in best)  # one epoch: best = last, both moved back
