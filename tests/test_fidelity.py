"""What the authors ran (issue 11): m-sharpness, BN statistics on every pass, the authors' SDS
rule, and the identities that tie SGD, SAM and ESAM together, bit for bit where they must be.

The m-sharpness references are computed by hand in float64 (torch.autograd.grad on a
functional copy, tests/helpers/reference.py) and against a real 2-process gloo DDP run in which each
rank holds one chunk, as in the authors' code.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from esam.optim import ESAM, SAM, SGD, make_closure
from helpers import (LR, MOMENTUM, RHO, TIGHT, WD, Reference, assert_all_close, assert_all_equal,
                     batches, convnet, loss_and_grad, mlp, sam_perturbation, weights)
from helpers import ddp_weights

KW = dict(lr=LR, momentum=MOMENTUM, weight_decay=WD)


pytestmark = pytest.mark.usefixtures("one_thread")


def run(opt_factory, model, data) -> list[torch.Tensor]:
    opt = opt_factory(model)
    for x, y in data:
        opt.step(make_closure(model, x, y))
    return weights(model)


# -- identities --------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mlp", "convnet"])
def test_sam_with_rho_zero_is_sgd_bit_for_bit(kind):
    data = batches(kind, 4, n=12)
    sgd = run(lambda m: SGD(m.parameters(), **KW), MODELS[kind](), data)
    sam = run(lambda m: SAM(m.parameters(), rho=0.0, model=m, **KW), MODELS[kind](), data)
    assert_all_equal(sam, sgd)


@pytest.mark.parametrize("kind", ["mlp", "convnet"])
def test_esam_with_beta_one_gamma_one_is_sam_bit_for_bit(kind):
    data = batches(kind, 4, n=12)
    sam = run(lambda m: SAM(m.parameters(), rho=RHO, model=m, **KW), MODELS[kind](), data)
    esam = run(lambda m: ESAM(m.parameters(), rho=RHO, beta=1.0, gamma=1.0, model=m, **KW), MODELS[kind](), data)
    assert_all_equal(esam, sam)


@pytest.mark.parametrize("cls,extra", [(SAM, {}), (ESAM, {"beta": 0.6, "gamma": 0.5, "seed": 3})])
def test_m_equal_to_the_batch_is_m_none_bit_for_bit(cls, extra):
    data = batches("convnet", 4, n=12)
    whole = run(lambda m: cls(m.parameters(), rho=RHO, model=m, **extra, **KW), convnet(), data)
    one_chunk = run(lambda m: cls(m.parameters(), rho=RHO, m=12, model=m, **extra, **KW), convnet(), data)
    assert_all_equal(one_chunk, whole)


# -- m-sharpness against the per-chunk math, by hand -------------------------------------
def chunk_reference(model, data, m, rho, gamma=1.0, authors=False):
    """Each chunk: g at w, e = rho g/||g||, its own SDS top-k by loss rise, h at w+e on the kept
    samples; the update gradient is the mean of the chunks' h."""
    ref = Reference(model)
    for x, y in data:
        hs = []
        for lo in range(0, x.shape[0], m):
            xc, yc = x[lo:lo + m], y[lo:lo + m]
            ws = ref.ws
            losses_w, g = loss_and_grad(ref.model, ws, xc, yc)
            e = sam_perturbation(ws, g, rho)
            we = [w + ei for w, ei in zip(ws, e)]
            keep = torch.arange(m)
            if gamma < 1:
                rise = loss_and_grad(ref.model, we, xc, yc)[0] - losses_w
                k = int(gamma * m)
                keep = (rise > rise.topk(k).values[-1]).nonzero().flatten() if authors else rise.topk(k).indices
            hs.append(loss_and_grad(ref.model, we, xc[keep], yc[keep])[1])
        ref.step_with([sum(h[i] for h in hs) / len(hs) for i in range(len(hs[0]))])
    return ref.ws


@pytest.mark.parametrize("cls,extra,gamma", [(SAM, {}, 1.0), (ESAM, {"beta": 1.0, "gamma": 0.5}, 0.5)])
@pytest.mark.parametrize("m", [4, 6])
def test_m_sharpness_is_the_mean_of_per_chunk_sam_steps(cls, extra, gamma, m):
    data = batches("mlp", 3, n=12)
    model = mlp()
    expected = chunk_reference(model, data, m, RHO, gamma)
    got = run(lambda mod: cls(mod.parameters(), rho=RHO, m=m, **extra, **KW), model, data)
    assert_all_close(got, expected)


def test_authors_selection_keeps_the_samples_strictly_above_the_kth_rise():
    data = batches("mlp", 3, n=12)
    model = mlp()
    expected = chunk_reference(model, data, 6, RHO, gamma=0.5, authors=True)
    opt = ESAM(model.parameters(), rho=RHO, beta=1.0, gamma=0.5, m=6, selection="authors", **KW)
    for x, y in data:
        opt.step(make_closure(model, x, y))
        assert opt.last_stats["sample_frac"] == pytest.approx(4 / 12)  # int(0.5 * 6) - 1 per chunk
    assert_all_close(weights(model), expected)


def test_m_sharpness_cost_and_stats_are_per_chunk_means():
    model = mlp()
    opt = ESAM(model.parameters(), rho=RHO, beta=1.0, gamma=0.5, m=4, **KW)
    x, y = batches("mlp", 1, n=12)[0]
    opt.step(make_closure(model, x, y))
    assert opt.last_stats["sample_frac"] == 0.5
    assert opt.last_cost == pytest.approx(1 + 2 + 1 + 1.5)  # fwd, full bwd, select fwd, half of 3


def test_m_must_divide_the_batch_and_needs_the_batch_size():
    model = mlp()
    x, y = batches("mlp", 1, n=12)[0]
    with pytest.raises(ValueError, match="m=5 must divide the batch of 12"):
        SAM(model.parameters(), m=5, **KW).step(make_closure(model, x, y))
    with pytest.raises(ValueError, match="closure.batch_size"):
        SAM(model.parameters(), m=4, **KW).step(lambda idx=None: nn.functional.cross_entropy(
            model(x if idx is None else x[idx]), y if idx is None else y[idx], reduction="none"))
    for bad in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match="m must be a positive int"):
            SAM(model.parameters(), m=bad, **KW)
    with pytest.raises(ValueError, match="bn_stats must be 'first' or 'all'"):
        SAM(model.parameters(), bn_stats="none", **KW)
    with pytest.raises(ValueError, match="selection must be 'topk' or 'authors'"):
        ESAM(model.parameters(), selection="bottom", **KW)


# -- BatchNorm running statistics -----------------------------------------------------
def bn_updates(opt_factory, m=None) -> int:
    model = convnet()
    opt = opt_factory(model, m)
    x, y = batches("convnet", 1, n=12)[0]
    opt.step(make_closure(model, x, y))
    return int(model[1].num_batches_tracked)


@pytest.mark.parametrize("bn_stats,m,sam_n,esam_n", [
    ("first", None, 1, 1),
    ("all", None, 2, 3),     # the authors' code: first, (selection,) second forward
    ("all", 6, 2, 3),        # chunks: only the first chunk's passes (DDP keeps rank 0's buffers)
    ("first", 6, 1, 1),
])
def test_bn_running_stats_are_updated_by_the_passes_the_switch_names(bn_stats, m, sam_n, esam_n):
    assert bn_updates(lambda mod, m: SAM(mod.parameters(), model=mod, m=m, bn_stats=bn_stats, **KW), m) == sam_n
    assert bn_updates(lambda mod, m: ESAM(mod.parameters(), model=mod, m=m, beta=1.0, gamma=0.5,
                                          bn_stats=bn_stats, **KW), m) == esam_n


# -- m-sharpness on one process = one chunk per DDP rank ----------------------------------
@pytest.mark.ddp
@pytest.mark.parametrize("method,extra", [("sam", {}), ("esam", {"beta": 1.0, "gamma": 0.5})])
def test_m_half_batch_equals_two_ddp_ranks_with_one_chunk_each(tmp_path, method, extra):
    rank0, _ = ddp_weights(tmp_path, method, dict(rho=RHO, **extra, **KW), model="convnet")
    cls = {"sam": SAM, "esam": ESAM}[method]
    one = run(lambda mod: cls(mod.parameters(), rho=RHO, m=6, model=mod, **extra, **KW), convnet(),
              batches("convnet", 3, n=12))
    assert_all_close(one, rank0, rtol=1e-9, atol=1e-11)


MODELS = {"mlp": mlp, "convnet": convnet}
