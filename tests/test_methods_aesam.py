"""AE-SAM (Jiang et al., ICLR 2023): the EMA policy and both of its steps, by hand in float64."""
from __future__ import annotations

import math

import pytest
import torch

from esam.optim import AESAM, METHODS
from esam.optim.switching import aesam_share
from helpers import CountingClosure, save_load, train_digits
from helpers import (LR, MOMENTUM, RHO, WD, Reference, assert_all_close, assert_all_equal, batches,
                     convnet, loss_and_grad, mlp, sam_perturbation, weights)

KW = dict(lr=LR, momentum=MOMENTUM, weight_decay=WD)


pytestmark = pytest.mark.usefixtures("one_thread")


# mu and sigma start at 0, so the first ~1/(1 - delta) steps are sharpness-aware: 40 steps at delta 0.9.
@pytest.mark.parametrize("delta,lambda1,lambda2,steps", [(0.9, -1.0, 1.0, 40), (0.5, -0.5, 0.5, 12)])
def test_policy_and_steps_match_hand_computation(delta, lambda1, lambda2, steps):
    model = mlp()
    ref = Reference(model)
    opt = AESAM(model.parameters(), "sgd", delta=delta, lambda1=lambda1, lambda2=lambda2, rho=RHO, **KW)
    mu = var = 0.0
    kinds = []
    for t, (x, y) in enumerate(batches("mlp", steps)):
        opt.set_progress(t, steps)
        closure = CountingClosure(model, x, y)
        out = opt.step(closure)

        w = ref.ws
        losses_w, g = loss_and_grad(ref.model, w, x, y)
        sq = float(sum((gi * gi).sum() for gi in g))
        mu = delta * mu + (1 - delta) * sq
        var = delta * var + (1 - delta) * (sq - mu) ** 2
        c = (t / steps) * lambda1 + (1 - t / steps) * lambda2
        sam = sq >= mu + c * math.sqrt(var)
        assert abs(sq - (mu + c * math.sqrt(var))) > 1e-9 * sq, "too close to the threshold to test"
        if sam:  # g is the first pass: perturb along it, gradient at w + e
            w_e = [wi + ei for wi, ei in zip(w, sam_perturbation(w, g, RHO))]
            losses_e, g_e = loss_and_grad(ref.model, w_e, x, y)
            ref.step_with(g_e)
            assert_all_close(closure.seen[1], w_e)
            torch.testing.assert_close(opt.last_stats["sharpness"], (losses_e - losses_w).mean())
        else:  # the SGD step uses the same g
            ref.step_with(g)
        kinds.append(sam)
        assert closure.passes == ((2, 2) if sam else (1, 1))
        assert opt.last_stats["sam_step"] == float(sam)
        assert opt.last_cost == (6.0 if sam else 3.0)
        assert opt.mu == pytest.approx(mu, rel=1e-12) and opt.var == pytest.approx(var, rel=1e-10)
        torch.testing.assert_close(out, losses_w)
        assert_all_close(weights(model), ref.ws)
    assert any(kinds) and not all(kinds), f"one branch only ({kinds}): the test checked too little"


def test_inner_esam_selects_samples_on_sam_steps_and_counts_its_cost():
    model = mlp()
    opt = AESAM(model.parameters(), "sgd", inner="esam", beta=1.0, gamma=0.5, lambda2=-10.0, lambda1=-10.0,
                rho=RHO, **KW)  # c = -10: every step is sharpness-aware
    for x, y in batches("mlp", 3):
        closure = CountingClosure(model, x, y)
        opt.step(closure)
        assert closure.passes == (2, 2) and closure.nograd_forwards == 1  # + SDS's selection forward
        assert opt.last_stats["sam_step"] == 1.0
        assert opt.last_cost == 3.0 + 1.0 + 3.0 * 0.5


def test_expected_cost_uses_the_normal_model_share():
    assert aesam_share(-1.0, 1.0) == pytest.approx(0.5)
    assert aesam_share(0.0, 0.0) == pytest.approx(0.5)
    assert aesam_share(1.0, 1.0) == pytest.approx(0.158655, abs=1e-6)  # P(Z >= 1)
    # mean of P(Z >= c) over c in [0, 2], by the midpoint rule
    mid = sum(0.5 * math.erfc((i + 0.5) / 1000 / math.sqrt(2)) for i in range(2000)) / 2000
    assert aesam_share(0.0, 2.0) == pytest.approx(mid, rel=1e-6)
    info = METHODS["aesam"]
    assert info.expected_cost() == pytest.approx(3 + 0.5 * 3)
    assert info.expected_cost(inner="esam", gamma=0.5) == pytest.approx(3 + 0.5 * (1 + 1.5))


@pytest.mark.parametrize("inside_evaluation", [True, False])
def test_state_dict_round_trip_keeps_the_emas_and_resumes_bit_for_bit(inside_evaluation):
    data, total = batches("convnet", 8), 8
    kw = dict(delta=0.5, rho=RHO, **KW)

    def run(model, opt, steps):
        out = []
        for t in steps:
            opt.set_progress(t, total)
            opt.step(CountingClosure(model, *data[t]))
            out.append(opt.last_stats["sam_step"])
        return out

    model = convnet()
    opt = AESAM(model.parameters(), "sgd", model=model, seed=1, **kw)
    run(model, opt, range(4))
    saved = save_load(model, opt, inside_evaluation=inside_evaluation)
    assert saved["opt"]["extra"]["aesam"] == {"mu": opt.mu, "var": opt.var} and opt.mu > 0
    straight = run(model, opt, range(4, 8))

    fresh = convnet(seed=5)
    fresh.load_state_dict(saved["model"])
    fresh_opt = AESAM(fresh.parameters(), "sgd", model=fresh, seed=99, **kw)
    fresh_opt.load_state_dict(saved["opt"])
    assert run(fresh, fresh_opt, range(4, 8)) == straight
    assert (fresh_opt.mu, fresh_opt.var) == (opt.mu, opt.var)
    assert_all_equal(weights(fresh), weights(model))
    assert_all_equal(list(fresh.buffers()), list(model.buffers()))


@pytest.mark.parametrize("kwargs,key", [
    ({"delta": 0.0}, "delta"), ({"delta": 1.0}, "delta"), ({"delta": "fast"}, "delta"),
    ({"lambda1": float("inf")}, "lambda1"), ({"lambda2": None}, "lambda2"),
    ({"m": 0}, "m"), ({"inner": "gsam"}, "inner"), ({"gamma": 0.0}, "gamma"), ({"rho": -1.0}, "rho"),
])
def test_bad_arguments_raise_value_error_naming_them(kwargs, key):
    with pytest.raises(ValueError, match=key):
        AESAM(mlp().parameters(), "sgd", lr=LR, **kwargs)


def test_trains_through_the_shared_trainer(tmp_path):
    rows = train_digits("aesam", tmp_path / "run")
    assert 0.0 < rows[-1]["method_sam_step"] <= 1.0  # the first step is always sharpness-aware (c_0 = 1)


@pytest.mark.ddp
def test_ddp_ranks_decide_alike_on_the_all_reduced_gradient(tmp_path):
    """Each rank sees its own shard; the test runs on the all-reduced ||g||^2, so both agree."""
    from helpers import ddp_decisions

    r0, r1 = ddp_decisions(tmp_path, "aesam", delta=0.5, lambda1=-0.5, lambda2=0.5, rho=RHO, **KW)
    assert r0["decisions"] == r1["decisions"] and 0 < sum(r0["decisions"]) < len(r0["decisions"])
    assert_all_equal(r0["weights"], r1["weights"])


def test_grad_scaler_step_equals_unscaled_step():
    from helpers import scaled_equals_unscaled

    scaled_equals_unscaled(lambda m: AESAM(m.parameters(), "sgd", delta=0.5, lambda1=-0.5, lambda2=0.5,
                                           rho=RHO, **KW), mlp, batches("mlp", 8))


def test_overflowing_first_pass_is_a_skipped_plain_step_that_leaves_the_emas_alone():
    model = mlp()
    opt = AESAM(model.parameters(), "sgd", rho=RHO, **KW)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    x, y = batches("mlp", 1)[0]
    opt.step(CountingClosure(model, x, y), grad_scaler=scaler)
    mu, var, before = opt.mu, opt.var, weights(model)
    closure = CountingClosure(model, x, y)
    opt.step(lambda indices=None: closure(indices) * float("inf"), grad_scaler=scaler)
    assert closure.passes == (1, 1) and opt.last_stats["sam_step"] == 0.0
    assert (opt.mu, opt.var) == (mu, var)
    assert_all_equal(weights(model), before)
    assert scaler.get_scale() == 2.0**11
