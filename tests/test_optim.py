"""esam.optim against updates computed by hand, step by step, in float64.

Every reference below is built from torch.autograd.grad on a functional copy of
the model plus a plain torch.optim.SGD (tests/helpers/reference.py); none of them calls esam.optim.
"""
from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from esam.optim import ESAM, SAM, SGD
from helpers import (LR, MODELS, MOMENTUM, RHO, TIGHT, WD, FakeDDP, Reference, assert_all_close,  # noqa: F401
                     assert_all_equal, batch, batches, convnet, global_norm, loss_and_grad, make_closure, mlp,
                     sam_perturbation, two_groups, weights)

pytestmark = pytest.mark.usefixtures("one_thread")


# -- SGD -----------------------------------------------------------------------------
def test_sgd_wrapper_is_one_pass_of_torch_sgd():
    model = mlp()
    ref = Reference(model)
    opt = SGD(model.parameters(), "sgd", lr=LR, momentum=MOMENTUM, weight_decay=WD)
    for x, y in batches("mlp", 3):
        calls = []
        out = opt.step(make_closure(model, x, y, calls))
        losses, g = loss_and_grad(ref.model, ref.ws, x, y)
        ref.step_with(g)
        assert len(calls) == 1 and calls[0]["indices"] is None
        assert not out.requires_grad
        torch.testing.assert_close(out, losses, **TIGHT)
        assert_all_close(weights(model), ref.ws)


# -- SAM / ASAM ----------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mlp", "convnet"])
@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_sam_matches_hand_computed_update(kind, adaptive):
    rho = 0.5 if adaptive else RHO
    model = MODELS[kind]()
    ref = Reference(model)
    opt = SAM(model.parameters(), "sgd", rho=rho, adaptive=adaptive,
              lr=LR, momentum=MOMENTUM, weight_decay=WD)
    for x, y in batches(kind, 3):  # several steps, so the momentum buffer matters
        calls = []
        out = opt.step(make_closure(model, x, y, calls))

        w = ref.ws
        losses_w, g = loss_and_grad(ref.model, w, x, y)
        e = sam_perturbation(w, g, rho, adaptive)
        w_e = [wi + ei for wi, ei in zip(w, e)]
        losses_e, g_e = loss_and_grad(ref.model, w_e, x, y)
        ref.step_with(g_e)

        assert [c["indices"] for c in calls] == [None, None]
        assert_all_close(calls[1]["weights"], w_e)  # the second pass ran at w + e
        assert not out.requires_grad
        torch.testing.assert_close(out, losses_w, **TIGHT)
        torch.testing.assert_close(opt.last_stats["sharpness"], (losses_e - losses_w).mean(), **TIGHT)
        assert_all_close(weights(model), ref.ws)


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_perturbation_norm_is_global_across_param_groups(adaptive):
    model = mlp()
    ref = Reference(model, split=True)
    opt = SAM(two_groups(model.parameters()), "sgd", rho=RHO, adaptive=adaptive,
              lr=LR, momentum=MOMENTUM, weight_decay=WD)
    for x, y in batches("mlp", 2):
        calls = []
        opt.step(make_closure(model, x, y, calls))
        w = ref.ws
        _, g = loss_and_grad(ref.model, w, x, y)
        w_e = [wi + ei for wi, ei in zip(w, sam_perturbation(w, g, RHO, adaptive))]
        assert_all_close(calls[1]["weights"], w_e)
        _, g_e = loss_and_grad(ref.model, w_e, x, y)
        ref.step_with(g_e)
        assert_all_close(weights(model), ref.ws)


@pytest.mark.parametrize("make_opt", [
    lambda ps: SAM(ps, "sgd", rho=RHO, lr=0.0),
    lambda ps: SAM(ps, "sgd", rho=0.5, adaptive=True, lr=0.0),
    lambda ps: ESAM(ps, "sgd", rho=RHO, beta=0.5, gamma=0.5, seed=0, lr=0.0),
], ids=["sam", "asam", "esam"])
def test_weights_restored_bitwise(make_opt):
    """w + e - e != w in floating point; the step must put the exact w back."""
    model = mlp()
    opt = make_opt(model.parameters())
    for x, y in batches("mlp", 3):
        before = weights(model)
        calls = []
        opt.step(make_closure(model, x, y, calls))
        assert any(not torch.equal(a, b) for a, b in zip(calls[-1]["weights"], before)), \
            "the second pass should have seen perturbed weights"
        assert_all_equal(weights(model), before)


def test_restore_leaves_unperturbed_tensors_alone():
    """A tensor perturbed in an earlier step but unused (no gradient) now must not be
    'restored' to an old copy of itself."""

    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.extra = nn.Linear(6, 3), nn.Linear(6, 3)
            self.use_extra = True

        def forward(self, x):
            return self.body(x) + (self.extra(x) if self.use_extra else 0.0)

    torch.manual_seed(0)
    model = Gated().double()
    opt = SAM(model.parameters(), "sgd", rho=RHO, lr=LR)
    x, y = batch("mlp")
    opt.step(make_closure(model, x, y))  # perturbs and updates ``extra``
    after_first = weights(model.extra)
    model.use_extra = False
    opt.step(make_closure(model, x, y))  # ``extra`` has no gradient: untouched
    assert_all_equal(weights(model.extra), after_first)


# -- ESAM ----------------------------------------------------------------------------
def test_esam_with_beta_gamma_one_is_sam_exactly():
    model_sam, model_esam = convnet(), convnet()
    kw = dict(rho=RHO, lr=LR, momentum=MOMENTUM, weight_decay=WD)
    sam = SAM(model_sam.parameters(), "sgd", model=model_sam, **kw)
    esam = ESAM(model_esam.parameters(), "sgd", beta=1.0, gamma=1.0, seed=3, model=model_esam, **kw)
    for x, y in batches("convnet", 4):
        calls = []
        a = sam.step(make_closure(model_sam, x, y))
        b = esam.step(make_closure(model_esam, x, y, calls))
        assert len(calls) == 2  # no selection forward when gamma = 1
        assert torch.equal(a, b)
    assert_all_equal(weights(model_esam), weights(model_sam))
    assert_all_equal(list(model_esam.buffers()), list(model_sam.buffers()))


@pytest.mark.parametrize("gamma", [0.5, 0.3])
def test_sds_second_pass_uses_samples_with_largest_rise(gamma):
    n = 10
    k = int(gamma * n)
    model = mlp()
    ref = Reference(model)
    opt = ESAM(model.parameters(), "sgd", rho=0.5, beta=1.0, gamma=gamma, seed=0,
               lr=LR, momentum=MOMENTUM, weight_decay=WD)
    for x, y in batches("mlp", 2, n=n):
        calls = []
        opt.step(make_closure(model, x, y, calls))

        w = ref.ws
        losses_w, g = loss_and_grad(ref.model, w, x, y)
        w_e = [wi + ei for wi, ei in zip(w, sam_perturbation(w, g, 0.5))]
        losses_e, _ = loss_and_grad(ref.model, w_e, x, y)
        rise = losses_e - losses_w
        chosen = torch.topk(rise, k).indices
        assert rise.sort(descending=True).values[k - 1] > rise.sort(descending=True).values[k]
        _, g_sub = loss_and_grad(ref.model, w_e, x[chosen], y[chosen])
        ref.step_with(g_sub)

        assert len(calls) == 3
        first, select, second = calls
        assert first["indices"] is None and first["grad_enabled"]
        assert select["indices"] is None and not select["grad_enabled"]  # selection is no-grad
        assert_all_close(select["weights"], w_e)
        assert set(second["indices"].tolist()) == set(chosen.tolist())
        assert_all_close(second["weights"], w_e)
        assert opt.last_stats["sample_frac"] == k / n
        torch.testing.assert_close(opt.last_stats["sharpness"], rise.mean(), **TIGHT)
        assert_all_close(weights(model), ref.ws)


def test_swp_perturbs_only_participants_and_updates_all():
    beta, rho = 0.5, 0.5
    model = mlp()
    ref = Reference(model)
    opt = ESAM(model.parameters(), "sgd", rho=rho, beta=beta, gamma=1.0, seed=0,
               lr=LR, momentum=MOMENTUM, weight_decay=WD)
    n_tensors = len(list(model.parameters()))
    partial_steps = 0
    for x, y in batches("mlp", 5):
        calls, before = [], weights(model)
        opt.step(make_closure(model, x, y, calls))
        first, second = calls
        mask = first["requires_grad"]  # non-participants: no weight gradient in the first pass
        partial_steps += 0 < sum(mask) < n_tensors
        assert all(second["requires_grad"]), "the second pass must give every tensor a gradient"
        assert all(p.requires_grad for p in model.parameters())
        assert opt.last_stats["param_frac"] == sum(mask) / n_tensors

        w = ref.ws
        _, g = loss_and_grad(ref.model, w, x, y)
        e = sam_perturbation(w, g, rho, mask=mask, beta=beta)  # norm over participants only
        w_e = [wi + ei for wi, ei in zip(w, e)]
        for m, seen, wb, wei in zip(mask, second["weights"], before, w_e):
            if m:
                torch.testing.assert_close(seen, wei, **TIGHT)
            else:
                assert torch.equal(seen, wb), "a non-participating tensor was perturbed"
        _, g_e = loss_and_grad(ref.model, w_e, x, y)
        ref.step_with(g_e)
        assert_all_close(weights(model), ref.ws)
    assert partial_steps > 0, "the draws never excluded a tensor: the test checked nothing"


def test_swp_draws_follow_the_seed():
    def draws(seed, global_seed):
        model = mlp()
        opt = ESAM(model.parameters(), "sgd", rho=RHO, beta=0.5, gamma=1.0, seed=seed, lr=LR)
        torch.manual_seed(global_seed)  # the draws must not depend on the global RNG
        out = []
        for x, y in batches("mlp", 6):
            calls = []
            opt.step(make_closure(model, x, y, calls))
            out.append(tuple(calls[0]["requires_grad"]))
        return out

    assert draws(0, global_seed=1) == draws(0, global_seed=2)
    assert draws(0, global_seed=1) != draws(1, global_seed=1)


# -- BatchNorm, DDP ------------------------------------------------------------------
@pytest.mark.parametrize("make_opt", [
    lambda ps, m: SAM(ps, "sgd", rho=RHO, lr=LR, model=m),
    lambda ps, m: ESAM(ps, "sgd", rho=RHO, beta=0.5, gamma=0.5, seed=0, lr=LR, model=m),
], ids=["sam", "esam"])
def test_bn_running_stats_updated_once_per_step(make_opt):
    model = convnet()
    once = copy.deepcopy(model)
    opt = make_opt(model.parameters(), model)
    x, y = batch("convnet")
    calls = []
    opt.step(make_closure(model, x, y, calls))
    assert len(calls) >= 2
    with torch.no_grad():
        once(x)  # the single train-mode forward the step should be equivalent to
    for (name, a), (_, b) in zip(model.named_buffers(), once.named_buffers()):
        assert torch.equal(a, b), name
    assert all(m.track_running_stats for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_bn_running_stats_follow_every_pass_without_model():
    """The contrast case: without ``model=`` nothing protects the running stats."""
    model = convnet()
    opt = SAM(model.parameters(), "sgd", rho=RHO, lr=LR)
    opt.step(make_closure(model, *batch("convnet")))
    assert int(model[1].num_batches_tracked) == 2


def test_first_pass_runs_under_no_sync():
    """DDP: the first backward stays local; the second one all-reduces."""
    model = FakeDDP(*mlp())
    seen = []
    inner = make_closure(model, *batch("mlp"))
    opt = SAM(model.parameters(), "sgd", rho=RHO, lr=LR, model=model)
    opt.step(lambda indices=None: (seen.append(model.syncing), inner(indices))[1])
    assert seen == [False, True]


def test_failing_closure_leaves_model_usable():
    model = convnet()
    opt = ESAM(model.parameters(), "sgd", rho=RHO, beta=0.3, gamma=0.5, seed=0, lr=LR, model=model)
    x, y = batch("convnet")
    for fail_at in (1, 2, 3):
        calls = []

        def closure(indices=None):
            calls.append(indices)
            if len(calls) == fail_at:
                raise RuntimeError("boom")
            return make_closure(model, x, y)(indices)

        with pytest.raises(RuntimeError, match="boom"):
            opt.step(closure)
        assert all(p.requires_grad for p in model.parameters())
        assert all(m.track_running_stats for m in model.modules() if isinstance(m, nn.BatchNorm2d))


# -- state, schedulers, validation -------------------------------------------------
def make_esam(model, seed):
    return ESAM(model.parameters(), "sgd", rho=RHO, beta=0.5, gamma=0.5, seed=seed, model=model,
                lr=LR, momentum=MOMENTUM, weight_decay=WD)


def test_state_dict_round_trip_continues_identically():
    data = batches("convnet", 6)
    model = convnet()
    opt = make_esam(model, seed=0)
    for x, y in data[:3]:
        opt.step(make_closure(model, x, y))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    for x, y in data[3:]:
        opt.step(make_closure(model, x, y))

    def resume(load_opt: bool):
        buf.seek(0)
        saved = torch.load(buf)
        fresh = convnet(seed=1)
        fresh.load_state_dict(saved["model"])
        fresh_opt = make_esam(fresh, seed=123)  # generator state must come from the checkpoint
        if load_opt:
            fresh_opt.load_state_dict(saved["opt"])
            assert fresh_opt.param_groups is fresh_opt.base_optimizer.param_groups
        for x, y in data[3:]:
            fresh_opt.step(make_closure(fresh, x, y))
        return fresh

    resumed = resume(load_opt=True)
    assert_all_equal(weights(resumed), weights(model))
    assert_all_equal(list(resumed.buffers()), list(model.buffers()))
    # Without the optimizer state (momentum, generator) the run differs: the check above bites.
    assert any(not torch.equal(a, b) for a, b in zip(weights(resume(load_opt=False)), weights(model)))


def test_lr_scheduler_drives_the_base_optimizer():
    model = mlp()
    opt = SAM(model.parameters(), "sgd", rho=RHO, lr=LR, momentum=MOMENTUM)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: [1.0, 0.5, 0.0][min(epoch, 2)])
    x, y = batch("mlp")
    opt.step(make_closure(model, x, y))
    sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(LR * 0.5)
    opt.step(make_closure(model, x, y))
    sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == 0.0
    # lr 0 and zero momentum contribution only if the base really uses the new lr:
    before = weights(model)
    opt.step(make_closure(model, x, y))
    assert_all_equal(weights(model), before)

    # Still true after a checkpoint load replaced the base's group dicts.
    opt.load_state_dict(opt.state_dict())
    opt.param_groups[0]["lr"] = 0.25
    assert opt.base_optimizer.param_groups[0]["lr"] == 0.25


BAD = [
    (lambda ps: SAM(ps, rho=-0.1), "rho"),
    (lambda ps: SAM(ps, rho=float("nan")), "rho"),
    (lambda ps: ESAM(ps, rho=-1.0), "rho"),
    *[(lambda ps, v=v: ESAM(ps, beta=v), "beta") for v in (0, 1.5, -0.1)],
    *[(lambda ps, v=v: ESAM(ps, gamma=v), "gamma") for v in (0, 1.5, -0.1)],
    *[(lambda ps, c=c: c(ps, "foo", lr=LR), "base.optimizer") for c in (SGD, SAM, ESAM)],
    *[(lambda ps, c=c: c(ps, dict, lr=LR), "base.optimizer") for c in (SGD, SAM, ESAM)],
    (lambda ps: SAM(ps, nn.Linear, lr=LR), "base.optimizer"),
]


@pytest.mark.parametrize("make_opt,name", BAD)
def test_invalid_arguments_raise_value_error_naming_them(make_opt, name):
    with pytest.raises(ValueError, match=name):
        make_opt(mlp().parameters())


# -- mixed precision -----------------------------------------------------------------
FP16_OPTS = {
    "sam": lambda m: SAM(m.parameters(), "sgd", rho=RHO, lr=LR, momentum=MOMENTUM, weight_decay=WD),
    "esam": lambda m: ESAM(m.parameters(), "sgd", rho=RHO, beta=0.5, gamma=0.5, seed=0,
                           lr=LR, momentum=MOMENTUM, weight_decay=WD),
}


@pytest.mark.parametrize("which", FP16_OPTS)
def test_grad_scaler_step_equals_unscaled_step(which):
    """torch.amp.GradScaler runs on CPU; the (power-of-two) scale must cancel out."""
    model, plain = mlp(), mlp()
    opt, ref = FP16_OPTS[which](model), FP16_OPTS[which](plain)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for x, y in batches("mlp", 3):
        opt.step(make_closure(model, x, y), grad_scaler=scaler)
        ref.step(make_closure(plain, x, y))
    assert scaler.get_scale() == 2.0**12
    assert_all_close(weights(model), weights(plain))


@pytest.mark.parametrize("which", FP16_OPTS)
@pytest.mark.parametrize("bad_call", [1, 2], ids=["first_pass_inf", "second_pass_inf"])
def test_grad_scaler_skips_overflowing_step(which, bad_call):
    model = mlp()
    opt = FP16_OPTS[which](model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    x, y = batch("mlp")
    grad_calls = []

    def closure(indices=None):
        losses = make_closure(model, x, y)(indices)
        if torch.is_grad_enabled():  # ESAM's selection forward does not backprop: not counted
            grad_calls.append(indices)
            if len(grad_calls) == bad_call:
                return losses * float("inf")
        return losses

    before = weights(model)
    opt.step(closure, grad_scaler=scaler)
    assert len(grad_calls) == bad_call  # an overflowing first pass ends the step at once
    assert_all_equal(weights(model), before)
    assert scaler.get_scale() == 2.0**11
    assert len(opt.state) == 0, "the skipped step must not touch the base optimizer's state"
    # and training goes on normally afterwards
    opt.step(make_closure(model, x, y), grad_scaler=scaler)
    assert any(not torch.equal(a, b) for a, b in zip(weights(model), before))
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("which", ["sam", "esam"])
def test_bf16_autocast_step_is_sensible(which):
    model, plain = mlp(dtype=torch.float32), mlp(dtype=torch.float32)
    make = {"sam": lambda m: SAM(m.parameters(), "sgd", rho=RHO, lr=LR),
            "esam": lambda m: ESAM(m.parameters(), "sgd", rho=RHO, beta=1.0, gamma=0.5, seed=0, lr=LR)}
    opt, ref = make[which](model), make[which](plain)
    x, y = batch("mlp", dtype=torch.float32)
    inner = make_closure(model, x, y)

    def closure(indices=None):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return inner(indices)

    before = weights(model)
    losses = opt.step(closure)
    ref.step(make_closure(plain, x, y))
    assert torch.isfinite(losses).all()
    delta = torch.cat([(a - b).flatten() for a, b in zip(weights(model), before)])
    delta_fp32 = torch.cat([(a - b).flatten() for a, b in zip(weights(plain), before)])
    assert torch.isfinite(delta).all() and delta.norm() > 0
    assert F.cosine_similarity(delta, delta_fp32, dim=0) > 0.95  # the bf16 update points the same way
    assert math.isclose(delta.norm().item(), delta_fp32.norm().item(), rel_tol=0.1)


# -- phases --------------------------------------------------------------------------
SAM_PHASES = ["first_pass", "perturb", "second_pass", "restore", "base_update", "end"]


@pytest.mark.parametrize("make_opt,phases", [
    (lambda ps: SGD(ps, lr=LR), ["first_pass", "base_update", "end"]),
    (lambda ps: SAM(ps, rho=RHO, lr=LR), SAM_PHASES),
    (lambda ps: ESAM(ps, rho=RHO, beta=0.5, gamma=1.0, seed=0, lr=LR), SAM_PHASES),
    (lambda ps: ESAM(ps, rho=RHO, beta=0.5, gamma=0.5, seed=0, lr=LR),
     ["first_pass", "perturb", "select_forward", "second_pass", "restore", "base_update", "end"]),
], ids=["sgd", "sam", "esam_swp", "esam_sds"])
def test_phase_hook_sees_phases_in_order(make_opt, phases):
    model = mlp()
    opt = make_opt(model.parameters())
    x, y = batch("mlp")
    opt.step(make_closure(model, x, y))  # no hook by default: nothing to call
    seen = []
    opt.phase_hook = seen.append
    opt.step(make_closure(model, x, y))
    assert seen == phases
