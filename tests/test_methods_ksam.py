"""K-SAM against its update computed by hand in float64, its pass and FLOP count, BatchNorm
statistics, resume and config.

The reference (Ni et al. 2022): rank the batch by loss at w, then SAM's two passes on the k
highest-loss samples, written out with torch.autograd.grad on a functional copy of the model
and a plain torch.optim.SGD (tests/helpers/reference.py).
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from helpers import train_digits
from helpers import ddp_weights
from esam.optim import METHODS, SAM, SGD
from esam.optim.ksam import KSAM
from helpers import (LR, MOMENTUM, RHO, TIGHT, WD, Reference, assert_all_close, assert_all_equal,
                     batch, batches, convnet, loss_and_grad, make_closure, mlp, sam_perturbation,
                     weights)

KW = dict(lr=LR, momentum=MOMENTUM, weight_decay=WD)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("kind", ["mlp", "convnet"])
@pytest.mark.parametrize("kw,k", [(dict(k_frac=0.3), 3), (dict(k_frac=0.3, k=4), 4)], ids=["k_frac", "k"])
def test_ksam_matches_hand_computed_update(kind, kw, k):
    n = 10
    model = mlp() if kind == "mlp" else convnet()
    ref = Reference(model)
    opt = KSAM(model.parameters(), "sgd", rho=0.5, model=model, **kw, **KW)
    for x, y in batches(kind, 3, n=n):
        calls = []
        out = opt.step(make_closure(model, x, y, calls))

        w = ref.ws
        losses_all, _ = loss_and_grad(ref.model, w, x, y)  # the ranking forward, whole batch
        top = losses_all.sort(descending=True).values
        assert top[k - 1] > top[k], "a tie at the k-th loss would make the test ambiguous"
        chosen = torch.topk(losses_all, k).indices
        losses_k, g = loss_and_grad(ref.model, w, x[chosen], y[chosen])
        w_e = [wi + ei for wi, ei in zip(w, sam_perturbation(w, g, 0.5))]
        losses_e, g_s = loss_and_grad(ref.model, w_e, x[chosen], y[chosen])
        ref.step_with(g_s)

        assert len(calls) == 3
        rank, first, second = calls
        assert rank["indices"] is None and not rank["grad_enabled"]   # no graph for the ranking
        assert set(first["indices"].tolist()) == set(chosen.tolist()) and first["grad_enabled"]
        assert torch.equal(second["indices"], first["indices"])
        assert_all_close(first["weights"], w)
        assert_all_close(second["weights"], w_e)
        torch.testing.assert_close(out, losses_all, **TIGHT)  # what the trainer logs: the batch at w
        assert not out.requires_grad
        torch.testing.assert_close(opt.last_stats["sharpness"], (losses_e - losses_k).mean(), **TIGHT)
        assert opt.last_stats["sample_frac"] == k / n
        assert opt.last_cost == pytest.approx(1 + 6 * k / n)
        assert_all_close(weights(model), ref.ws)


def test_k_frac_one_is_sam_bit_for_bit():
    """k = B: both passes on the whole batch, i.e. SAM (plus the ranking forward)."""
    model_sam, model_k = mlp(), mlp()
    sam = SAM(model_sam.parameters(), "sgd", rho=RHO, **KW)
    ksam = KSAM(model_k.parameters(), "sgd", rho=RHO, k_frac=1.0, **KW)
    for x, y in batches("mlp", 3):
        calls = []
        assert torch.equal(sam.step(make_closure(model_sam, x, y)), ksam.step(make_closure(model_k, x, y, calls)))
        assert [c["indices"] for c in calls] == [None, None, None]
        assert ksam.last_cost == 7.0
    assert_all_equal(weights(model_k), weights(model_sam))


def test_flops_are_one_forward_of_the_batch_plus_two_sgd_steps_on_k():
    """The saving is real: FLOPs of a K-SAM step = forward(B) + 2 x (forward + backward)(k)."""
    n, k = 10, 3
    x, y = batch("mlp", n=n)
    model = mlp()
    opt = KSAM(model.parameters(), "sgd", rho=RHO, k_frac=k / n, **KW)
    with FlopCounterMode(display=False) as counter:
        opt.step(make_closure(model, x, y))
    ksam_flops = counter.get_total_flops()

    probe = mlp()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        probe(x)
    forward_b = counter.get_total_flops()
    sgd = SGD(probe.parameters(), "sgd", **KW)
    with FlopCounterMode(display=False) as counter:
        sgd.step(make_closure(probe, x[:k], y[:k]))
    sgd_k = counter.get_total_flops()
    assert ksam_flops == forward_b + 2 * sgd_k
    assert METHODS["ksam"].expected_cost(k_frac=k / n) == pytest.approx(1 + 6 * k / n)


def test_bn_running_stats_updated_once_by_the_whole_batch():
    model = convnet()
    once = copy.deepcopy(model)
    opt = KSAM(model.parameters(), "sgd", rho=RHO, k_frac=0.3, model=model, **KW)
    x, y = batch("convnet")
    opt.step(make_closure(model, x, y))
    with torch.no_grad():
        once(x)  # the single train-mode forward of the batch the step should be equivalent to
    for (name, a), (_, b) in zip(model.named_buffers(), once.named_buffers()):
        assert torch.equal(a, b), name
    assert all(m.track_running_stats for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def make(model, seed=0):
    return KSAM(model.parameters(), "sgd", rho=RHO, k_frac=0.3, model=model, seed=seed, **KW)


def test_grad_scaler_step_equals_unscaled_step():
    model, plain = mlp(), mlp()
    opt, ref = make(model), make(plain)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for x, y in batches("mlp", 3):
        opt.step(make_closure(model, x, y), grad_scaler=scaler)
        ref.step(make_closure(plain, x, y))
    assert scaler.get_scale() == 2.0**12
    assert_all_close(weights(model), weights(plain))


BAD = [
    *[(dict(k_frac=v), "k_frac") for v in (0.0, 1.5, -0.1, float("nan"))],
    *[(dict(k=v), "k") for v in (-1, 1.5, True)],
    (dict(rho=-0.1), "rho"),
]


@pytest.mark.parametrize("kwargs,name", BAD)
def test_invalid_arguments_raise_value_error_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        KSAM(mlp().parameters(), "sgd", lr=LR, **kwargs)


def test_trains_through_the_shared_trainer(tmp_path):
    record = train_digits("ksam", tmp_path / "run")[0]
    assert record["method_sample_frac"] == pytest.approx(0.36, abs=0.01)  # int(0.36 * B) of each batch (the default)
    assert record["train_steps"] == 5


# -- DDP: each rank ranks and perturbs on its own shard; the second backward all-reduces ------




@pytest.mark.ddp
def test_ddp_ranks_select_and_perturb_locally(tmp_path):
    rank0, rank1 = ddp_weights(
        tmp_path, "ksam", dict(base_optimizer="sgd", rho=0.5, k_frac=0.5, **KW), steps=3)
    assert_all_equal(rank0, rank1)

    model = mlp()
    ref = Reference(model)
    for x, y in batches("mlp", 3, n=12):
        w, grads = ref.ws, []
        for half in (slice(0, 6), slice(6, 12)):  # each rank: its top 3 of 6, its own w + e
            xs, ys = x[half], y[half]
            losses, _ = loss_and_grad(ref.model, w, xs, ys)
            top = torch.topk(losses, 3).indices
            _, g = loss_and_grad(ref.model, w, xs[top], ys[top])
            w_e = [wi + ei for wi, ei in zip(w, sam_perturbation(w, g, 0.5))]
            grads.append(loss_and_grad(ref.model, w_e, xs[top], ys[top])[1])
        ref.step_with([(a + b) / 2 for a, b in zip(*grads)])
    assert_all_close(rank0, ref.ws, rtol=1e-9, atol=1e-11)


def test_phase_hook_sees_phases_in_order():
    model = mlp()
    opt = KSAM(model.parameters(), "sgd", k_frac=0.5, lr=LR)
    seen = []
    opt.phase_hook = seen.append
    opt.step(make_closure(model, *batch("mlp")))
    assert seen == ["select_forward", "first_pass", "perturb", "second_pass", "restore", "base_update", "end"]
