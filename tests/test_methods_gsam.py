"""GSAM against its update computed by hand in float64 (rho following the lr), its reduction to
SAM, its pass count, resume and config.

The reference is Algorithm 1 of Zhuang et al. (ICLR 2022) written out with torch.autograd.grad
on a functional copy of the model and a plain torch.optim.SGD (tests/helpers/reference.py).
"""
from __future__ import annotations


import pytest
import torch

from helpers import counting_closure, train_digits
from helpers import ddp_weights
from esam.optim import SAM
from esam.optim.gsam import GSAM
from helpers import (LR, MOMENTUM, TIGHT, WD, Reference, assert_all_close, assert_all_equal, batch,
                     batches, convnet, loss_and_grad, make_closure, mlp, sam_perturbation, weights)

KW = dict(lr=LR, momentum=MOMENTUM, weight_decay=WD)
EPS = 1e-12  # the optimizer's guard against 0/0, written into the reference too
RHO_MAX, RHO_MIN, ALPHA = 0.2, 0.05, 0.3  # large, so a wrong schedule or sign shows
LR_FACTORS = [1.0, 0.5, 0.25, 0.0]


pytestmark = pytest.mark.usefixtures("one_thread")


def dot(a, b) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))


def set_lr(opt, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


@pytest.mark.parametrize("kind", ["mlp", "convnet"])
def test_gsam_matches_hand_computed_update(kind):
    model = mlp() if kind == "mlp" else convnet()
    ref = Reference(model)
    opt = GSAM(model.parameters(), "sgd", rho=RHO_MAX, rho_min=RHO_MIN, alpha=ALPHA, model=model, **KW)
    for factor, (x, y) in zip(LR_FACTORS, batches(kind, len(LR_FACTORS))):
        set_lr(opt, LR * factor)       # as an LR scheduler would
        set_lr(ref.base, LR * factor)
        calls = []
        out = opt.step(make_closure(model, x, y, calls))

        rho_t = RHO_MIN + (RHO_MAX - RHO_MIN) * factor  # (lr - 0) / (lr_max - 0) = factor
        w = ref.ws
        losses_w, g = loss_and_grad(ref.model, w, x, y)
        w_e = [wi + ei for wi, ei in zip(w, sam_perturbation(w, g, rho_t))]
        losses_e, g_s = loss_and_grad(ref.model, w_e, x, y)
        g_perp = [gi - dot(g, g_s) / (dot(g_s, g_s) + EPS) * gs for gi, gs in zip(g, g_s)]
        assert abs(dot(g_perp, g_s)) < 1e-10 * dot(g_s, g_s)  # orthogonal to g_s (up to the eps)
        ref.step_with([gs - ALPHA * gp for gs, gp in zip(g_s, g_perp)])

        assert [c["indices"] for c in calls] == [None, None]
        assert_all_close(calls[1]["weights"], w_e)  # the second pass ran at w + e(rho_t)
        assert opt.last_stats["rho"] == pytest.approx(rho_t, rel=1e-15)
        torch.testing.assert_close(opt.last_stats["sharpness"], (losses_e - losses_w).mean(), **TIGHT)
        torch.testing.assert_close(out, losses_w, **TIGHT)
        assert opt.last_cost == 6.0
        assert_all_close(weights(model), ref.ws)


def test_alpha0_and_constant_rho_is_sam_bit_for_bit():
    model_sam, model_gsam = convnet(), convnet()
    sam = SAM(model_sam.parameters(), "sgd", rho=0.05, model=model_sam, **KW)
    gsam = GSAM(model_gsam.parameters(), "sgd", rho=0.05, rho_min=0.05, alpha=0.0, model=model_gsam, **KW)
    for factor, (x, y) in zip(LR_FACTORS, batches("convnet", 4)):
        set_lr(sam, LR * factor)
        set_lr(gsam, LR * factor)
        assert torch.equal(sam.step(make_closure(model_sam, x, y)), gsam.step(make_closure(model_gsam, x, y)))
    assert_all_equal(weights(model_gsam), weights(model_sam))
    assert_all_equal(list(model_gsam.buffers()), list(model_sam.buffers()))


@pytest.mark.parametrize("lr_min,factor,expected", [
    (0.0, 1.0, RHO_MAX), (0.0, 0.0, RHO_MIN), (0.0, 0.5, (RHO_MAX + RHO_MIN) / 2),
    (LR / 2, 0.5, RHO_MIN),       # at lr_min: rho_min
    (LR, 0.5, RHO_MAX),           # lr_max <= lr_min: rho stays rho_max (the authors' rule)
    (0.0, 2.0, 2 * RHO_MAX - RHO_MIN),  # above the built lr: extrapolated, not clipped (as theirs)
])
def test_rho_follows_the_lr(lr_min, factor, expected):
    model = mlp()
    opt = GSAM(model.parameters(), "sgd", rho=RHO_MAX, rho_min=RHO_MIN, alpha=ALPHA, lr_min=lr_min, lr=LR)
    set_lr(opt, LR * factor)
    opt.step(make_closure(model, *batch("mlp")))
    assert opt.last_stats["rho"] == pytest.approx(expected, rel=1e-12)
    assert opt.param_groups[0]["rho"] == opt.last_stats["rho"]


def test_two_passes_two_backwards():
    model = mlp()
    opt = GSAM(model.parameters(), "sgd", lr=LR)
    backwards, calls = [], []
    opt.step(counting_closure(model, *batch("mlp"), calls, backwards))
    assert len(calls) == 2 and len(backwards) == 2 and all(c["grad_enabled"] for c in calls)


def make(model, lr=LR):
    return GSAM(model.parameters(), "sgd", rho=RHO_MAX, rho_min=RHO_MIN, alpha=ALPHA, model=model,
                lr=lr, momentum=MOMENTUM, weight_decay=WD)


def test_grad_scaler_step_equals_unscaled_step():
    model, plain = mlp(), mlp()
    opt, ref = make(model), make(plain)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for x, y in batches("mlp", 3):
        opt.step(make_closure(model, x, y), grad_scaler=scaler)
        ref.step(make_closure(plain, x, y))
    assert scaler.get_scale() == 2.0**12
    # the 1e-12 guard in the projection sees scaled gradients: equal up to that, not bitwise
    assert_all_close(weights(model), weights(plain), rtol=1e-6, atol=1e-10)


BAD = [
    (dict(rho=-0.1), "rho"),
    (dict(rho=float("nan")), "rho"),
    (dict(rho=0.05, rho_min=0.1), "rho_min"),
    (dict(rho_min=-0.01), "rho_min"),
    (dict(alpha=-0.1), "alpha"),
    (dict(alpha=float("nan")), "alpha"),
    (dict(lr_min=-1e-3), "lr_min"),
]


@pytest.mark.parametrize("kwargs,name", BAD)
def test_invalid_arguments_raise_value_error_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        GSAM(mlp().parameters(), "sgd", lr=LR, **kwargs)


def test_trains_through_the_shared_trainer(tmp_path):
    record = train_digits("gsam", tmp_path / "run")[0]
    assert record["method_rho"] == pytest.approx(0.05)  # epoch 1 of a per-epoch cosine: lr = lr_max; rho = sam.rho (the recipe's radius)
    assert record["train_steps"] == 5


# -- DDP: each rank decomposes its own gradients, then the directions are averaged ----------




@pytest.mark.ddp
def test_ddp_ranks_decompose_locally_and_average(tmp_path):
    rank0, rank1 = ddp_weights(
        tmp_path, "gsam", dict(base_optimizer="sgd", rho=RHO_MAX, rho_min=RHO_MIN, alpha=ALPHA, **KW), steps=3)
    assert_all_equal(rank0, rank1)  # the ranks stay in step

    model = mlp()
    ref = Reference(model)
    for x, y in batches("mlp", 3, n=12):
        w, directions = ref.ws, []
        for half in (slice(0, 6), slice(6, 12)):  # what each rank computes on its own half
            _, g = loss_and_grad(ref.model, w, x[half], y[half])
            w_e = [wi + ei for wi, ei in zip(w, sam_perturbation(w, g, RHO_MAX))]  # lr = lr_max
            _, g_s = loss_and_grad(ref.model, w_e, x[half], y[half])
            c = dot(g, g_s) / (dot(g_s, g_s) + EPS)
            directions.append([gs - ALPHA * (gi - c * gs) for gi, gs in zip(g, g_s)])
        ref.step_with([(a + b) / 2 for a, b in zip(*directions)])
    assert_all_close(rank0, ref.ws, rtol=1e-9, atol=1e-11)


def test_phase_hook_sees_phases_in_order():
    model = mlp()
    opt = GSAM(model.parameters(), "sgd", lr=LR)
    seen = []
    opt.phase_hook = seen.append
    opt.step(make_closure(model, *batch("mlp")))
    assert seen == ["first_pass", "perturb", "second_pass", "restore", "decompose", "base_update", "end"]
