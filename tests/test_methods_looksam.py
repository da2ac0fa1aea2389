"""LookSAM against its update computed by hand in float64, its pass count, resume and config.

The reference is Algorithm 1 of Liu et al. (CVPR 2022) written out with torch.autograd.grad on a
functional copy of the model and a plain torch.optim.SGD (tests/helpers/reference.py).
"""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from helpers import counting_closure, train_digits
from helpers import ddp_weights
from esam.optim import METHODS, SAM, SGD
from esam.optim import make_closure as esam_closure
from esam.optim.looksam import LookSAM
from helpers import (LR, MOMENTUM, RHO, TIGHT, WD, Reference, assert_all_close, assert_all_equal,
                     batch, batches, convnet, global_norm, loss_and_grad, make_closure, mlp,
                     sam_perturbation, weights)

KW = dict(lr=LR, momentum=MOMENTUM, weight_decay=WD)
EPS = 1e-12  # the optimizer's guard against 0/0, written into the reference too


pytestmark = pytest.mark.usefixtures("one_thread")


def dot(a, b) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))


@pytest.mark.parametrize("kind", ["mlp", "convnet"])
def test_looksam_matches_hand_computed_update(kind):
    k, alpha, steps = 3, 0.7, 8  # SAM steps at t = 0, 3, 6; reuse steps carry g_v across
    model = mlp() if kind == "mlp" else convnet()
    ref = Reference(model)
    opt = LookSAM(model.parameters(), "sgd", rho=RHO, k=k, alpha=alpha, model=model, **KW)
    g_v = None
    for t, (x, y) in enumerate(batches(kind, steps)):
        calls = []
        out = opt.step(make_closure(model, x, y, calls))

        w = ref.ws
        losses_w, g = loss_and_grad(ref.model, w, x, y)
        if t % k == 0:
            w_e = [wi + ei for wi, ei in zip(w, sam_perturbation(w, g, RHO))]
            _, g_s = loss_and_grad(ref.model, w_e, x, y)
            g_v = [gs - dot(g, g_s) / (dot(g, g) + EPS) * gi for gi, gs in zip(g, g_s)]
            ref.step_with(g_s)
            assert len(calls) == 2
            assert_all_close(calls[1]["weights"], w_e)
            assert opt.last_stats == {"sam_step": 1.0} and opt.last_cost == 6.0
        else:
            scale = alpha * global_norm(g) / (global_norm(g_v) + EPS)
            ref.step_with([gi + scale * v for gi, v in zip(g, g_v)])
            assert len(calls) == 1 and calls[0]["grad_enabled"]
            assert opt.last_stats == {"sam_step": 0.0} and opt.last_cost == 3.0
        assert calls[0]["indices"] is None and not out.requires_grad
        torch.testing.assert_close(out, losses_w, **TIGHT)
        assert_all_close(weights(model), ref.ws)


def test_k1_is_sam_bit_for_bit():
    """k = 1: every step is a SAM step and the update is g_s, exactly SAM's."""
    model_sam, model_look = convnet(), convnet()
    sam = SAM(model_sam.parameters(), "sgd", rho=RHO, model=model_sam, **KW)
    look = LookSAM(model_look.parameters(), "sgd", rho=RHO, k=1, alpha=0.7, model=model_look, **KW)
    for x, y in batches("convnet", 4):
        assert torch.equal(sam.step(make_closure(model_sam, x, y)), look.step(make_closure(model_look, x, y)))
    assert_all_equal(weights(model_look), weights(model_sam))
    assert_all_equal(list(model_look.buffers()), list(model_sam.buffers()))


def test_alpha0_reuse_steps_are_sgd_steps():
    model_sgd, model_look = mlp(), mlp()
    sgd = SGD(model_sgd.parameters(), "sgd", **KW)
    look = LookSAM(model_look.parameters(), "sgd", rho=RHO, k=3, alpha=0.0, **KW)
    x, y = batch("mlp")
    look.step(make_closure(model_look, x, y))  # the SAM step: both models now start equal
    model_sgd.load_state_dict(model_look.state_dict())
    sgd.base_optimizer.load_state_dict(copy.deepcopy(look.base_optimizer.state_dict()))
    for x, y in batches("mlp", 2):
        sgd.step(make_closure(model_sgd, x, y))
        look.step(make_closure(model_look, x, y))
    assert_all_equal(weights(model_look), weights(model_sgd))


def test_cheap_steps_run_one_forward_and_one_backward():
    """Closure calls, backward passes and FLOPs per step: 2/2/2x SGD on SAM steps, 1/1/1x else."""
    model, model_sgd = mlp(), mlp()
    opt = LookSAM(model.parameters(), "sgd", rho=RHO, k=5, alpha=0.1, **KW)
    sgd = SGD(model_sgd.parameters(), "sgd", **KW)
    n_calls, n_backwards, flops = [], [], []
    for x, y in batches("mlp", 10):
        calls, backwards = [], []
        with FlopCounterMode(display=False) as counter:
            opt.step(counting_closure(model, x, y, calls, backwards))
        n_calls.append(len(calls))
        n_backwards.append(len(backwards))
        flops.append(counter.get_total_flops())
    with FlopCounterMode(display=False) as counter:
        sgd.step(make_closure(model_sgd, *batch("mlp")))
    sgd_flops = counter.get_total_flops()
    assert n_calls == [2, 1, 1, 1, 1, 2, 1, 1, 1, 1]
    assert n_backwards == n_calls
    assert flops == [2 * sgd_flops if c == 2 else sgd_flops for c in n_calls]
    # the declared cost is the mean of what the steps ran
    assert METHODS["looksam"].expected_cost(k=5) == pytest.approx(sum(3.0 * c for c in n_calls) / 10)


def make(model, seed=0):
    return LookSAM(model.parameters(), "sgd", rho=RHO, k=3, alpha=0.7, model=model, seed=seed, **KW)


@pytest.mark.parametrize("stop", [4, 5, 6], ids=["after_one_reuse", "mid_cycle", "at_a_sam_step"])
def test_state_dict_round_trip_resumes_bit_for_bit(stop):
    data = batches("convnet", 9)
    model = convnet()
    opt = make(model)
    for x, y in data[:stop]:
        opt.step(make_closure(model, x, y))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    for x, y in data[stop:]:
        opt.step(make_closure(model, x, y))

    def resume(keep_looksam_state: bool):
        buf.seek(0)
        saved = torch.load(buf, weights_only=False)
        if not keep_looksam_state:
            saved["opt"]["extra"] = {k: v for k, v in saved["opt"]["extra"].items() if not k.startswith("looksam")}
        fresh = convnet(seed=1)
        fresh.load_state_dict(saved["model"])
        fresh_opt = make(fresh, seed=5)
        fresh_opt.load_state_dict(saved["opt"])
        n_calls = []
        for x, y in data[stop:]:
            calls = []
            fresh_opt.step(make_closure(fresh, x, y, calls))
            n_calls.append(len(calls))
        return fresh, n_calls

    resumed, n_calls = resume(keep_looksam_state=True)
    assert n_calls == [2 if t % 3 == 0 else 1 for t in range(stop, 9)]  # the counter came back
    assert_all_equal(weights(resumed), weights(model))
    assert_all_equal(list(resumed.buffers()), list(model.buffers()))
    if stop % 3:  # resumed mid-cycle, without g_v and the counter the run differs: the check bites
        lost, _ = resume(keep_looksam_state=False)
        assert any(not torch.equal(a, b) for a, b in zip(weights(lost), weights(model)))


def test_state_dict_load_copies_g_v():
    """Loading the same in-memory state into an optimizer must not share buffers with it."""
    model = mlp()
    opt = make(model)
    opt.step(make_closure(model, *batch("mlp")))
    state = opt.state_dict()
    before = [t.clone() for t in state["extra"]["looksam_gv"]]
    other_model = mlp()
    other = make(other_model)
    other.load_state_dict(state)
    for seed in (1, 2, 3):  # two reuse steps, then a SAM step that rewrites g_v in place
        other.step(make_closure(other_model, *batch("mlp", seed=seed)))
    assert_all_equal(state["extra"]["looksam_gv"], before)


def test_grad_scaler_step_equals_unscaled_step():
    model, plain = mlp(), mlp()
    opt, ref = make(model), make(plain)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for x, y in batches("mlp", 5):
        opt.step(make_closure(model, x, y), grad_scaler=scaler)
        ref.step(make_closure(plain, x, y))
    assert scaler.get_scale() == 2.0**12
    # the 1e-12 guards in the projection see scaled gradients: equal up to that, not bitwise
    assert_all_close(weights(model), weights(plain), rtol=1e-6, atol=1e-10)


def test_fp16_overflow_in_a_sam_step_makes_the_next_step_a_sam_step():
    model = mlp()
    opt = make(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    x, y = batch("mlp")
    before = weights(model)

    def overflowing(indices=None):
        return make_closure(model, x, y)(indices) * float("inf")

    opt.step(overflowing, grad_scaler=scaler)  # t = 0: SAM step, skipped
    assert_all_equal(weights(model), before)
    calls = []
    opt.step(make_closure(model, x, y, calls), grad_scaler=scaler)  # t = 1: no g_v yet -> SAM
    assert len(calls) == 2 and opt.last_stats["sam_step"] == 1.0
    assert all(torch.isfinite(p).all() for p in model.parameters())


BAD = [
    *[(dict(k=v), "k") for v in (0, -1, 1.5, True)],
    *[(dict(alpha=v), "alpha") for v in (-0.1, float("nan"))],
    (dict(rho=-0.1), "rho"),
]


@pytest.mark.parametrize("kwargs,name", BAD)
def test_invalid_arguments_raise_value_error_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        LookSAM(mlp().parameters(), "sgd", lr=LR, **kwargs)


def test_trains_through_the_shared_trainer(tmp_path):
    record = train_digits("looksam", tmp_path / "run")[0]
    assert record["method_sam_step"] == pytest.approx(1 / 5)  # one SAM step in five (k = 5)
    assert record["train_steps"] == 5


# -- DDP: every pass all-reduced, so g_v is the same on every rank ----------------------------




@pytest.mark.ddp
@pytest.mark.parametrize("m", [None, pytest.param(3, marks=pytest.mark.slow)])
def test_ddp_ranks_share_g_v_and_equal_one_process_on_the_whole_batch(tmp_path, m):
    """m=3: two chunks per rank of 6, g all-reduced by hand: one process with four chunks of 3."""
    rank0, rank1 = ddp_weights(
        tmp_path, "looksam", dict(base_optimizer="sgd", rho=RHO, k=2, alpha=0.7, m=m, **KW), steps=4)
    assert_all_equal(rank0, rank1)  # reuse steps use the same g_v everywhere: the ranks stay in step
    model = mlp()
    opt = LookSAM(model.parameters(), "sgd", rho=RHO, k=2, alpha=0.7, m=m, **KW)
    for x, y in batches("mlp", 4, n=12):
        opt.step(esam_closure(model, x, y))  # carries batch_size, which m needs
    assert_all_close(rank0, weights(model), rtol=1e-9, atol=1e-11)


def test_phase_hook_sees_each_kind_of_step():
    model = mlp()
    opt = LookSAM(model.parameters(), "sgd", rho=RHO, k=2, lr=LR)
    seen = []
    opt.phase_hook = seen.append
    for x, y in batches("mlp", 2):
        opt.step(make_closure(model, x, y))
    assert seen == ["first_pass", "perturb", "second_pass", "restore", "base_update", "end",
                    "first_pass", "reuse", "base_update", "end"]
