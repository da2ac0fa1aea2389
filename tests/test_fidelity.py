"""What the authors ran: m-sharpness, BN statistics on every pass, the authors' SDS
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
from helpers import (LR, MOMENTUM, RHO, TIGHT, WD, Reference, assert_all_close, assert_all_equal, global_norm,
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


def test_a_batch_m_does_not_divide_is_cut_into_near_equal_chunks():
    """An epoch's short last batch (CIFAR: 50,000 = 390 x 128 + 80) must not stop an m=64 run:
    80 samples are 2 chunks of 40, as 2 DDP ranks of 64 share it. 12 at m=5: 3 chunks of 4."""
    data = batches("mlp", 3, n=12)
    four = run(lambda mod: SAM(mod.parameters(), rho=RHO, m=4, **KW), mlp(), data)
    five = run(lambda mod: SAM(mod.parameters(), rho=RHO, m=5, **KW), mlp(), data)
    assert_all_equal(five, four)
    model = mlp()
    x, y = batches("mlp", 1, n=10)[0]
    seen = []
    inner = make_closure(model, x, y)

    def closure(indices=None):
        seen.append(None if indices is None else indices.tolist())
        return inner(indices)

    closure.batch_size = 10
    SAM(model.parameters(), rho=RHO, m=4, **KW).step(closure)
    assert seen[::2] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]  # each chunk's first pass


def test_m_needs_the_batch_size_and_a_positive_int():
    model = mlp()
    x, y = batches("mlp", 1, n=12)[0]
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


# -- every SAM-based method honours m as B/m ranks with per-rank perturbation would (issue 20.3) --
def per_chunk_sam(ref, ws, x, y, m, rho):
    """[(g_c, h_c)] per chunk of m: g_c at w, h_c at w + rho g_c/||g_c|| (the chunk's own e)."""
    out = []
    for lo in range(0, x.shape[0], m):
        xc, yc = x[lo:lo + m], y[lo:lo + m]
        _, g = loss_and_grad(ref.model, ws, xc, yc)
        we = [w + e for w, e in zip(ws, sam_perturbation(ws, g, rho))]
        out.append((g, loss_and_grad(ref.model, we, xc, yc)[1]))
    return out


def mean_of(vectors):
    return [sum(v[i] for v in vectors) / len(vectors) for i in range(len(vectors[0]))]


def dot(a, b):
    return sum((u * v).sum() for u, v in zip(a, b))


def test_looksam_m_chunks_its_sam_steps_and_builds_g_v_from_the_batch_means():
    from esam.optim import LookSAM

    k, alpha, m = 2, 0.7, 4
    data = batches("mlp", 5, n=12)
    model = mlp()
    ref = Reference(model)
    opt = LookSAM(model.parameters(), rho=RHO, k=k, alpha=alpha, m=m, **KW)
    gv = None
    for t, (x, y) in enumerate(data):
        opt.step(make_closure(model, x, y))
        ws = ref.ws
        if t % k == 0:
            pairs = per_chunk_sam(ref, ws, x, y, m, RHO)
            g, g_s = mean_of([p[0] for p in pairs]), mean_of([p[1] for p in pairs])
            coef = dot(g, g_s) / dot(g, g)
            gv = [gs - coef * gi for gs, gi in zip(g_s, g)]
            ref.step_with(g_s)
        else:  # the reuse step: the whole batch's g plus alpha ||g||/||g_v|| g_v
            _, g = loss_and_grad(ref.model, ws, x, y)
            scale = alpha * global_norm(g) / global_norm(gv)
            ref.step_with([gi + scale * v for gi, v in zip(g, gv)])
        assert opt.last_stats["sam_step"] == float(t % k == 0)
        assert_all_close(weights(model), ref.ws)


def test_gsam_m_decomposes_each_chunk_and_averages():
    from esam.optim import GSAM

    alpha, m = 0.3, 6
    data = batches("mlp", 3, n=12)
    model = mlp()
    ref = Reference(model)
    opt = GSAM(model.parameters(), rho=RHO, rho_min=RHO, alpha=alpha, m=m, **KW)  # rho_t = rho
    for x, y in data:
        opt.step(make_closure(model, x, y))
        ds = []
        for g, h in per_chunk_sam(ref, ref.ws, x, y, m, RHO):
            coef = dot(g, h) / dot(h, h)
            ds.append([hi - alpha * (gi - coef * hi) for gi, hi in zip(g, h)])
        ref.step_with(mean_of(ds))
        assert_all_close(weights(model), ref.ws)


def test_ksam_m_selects_and_perturbs_per_chunk():
    from esam.optim import KSAM

    m, k_frac = 6, 0.5
    data = batches("mlp", 3, n=12)
    model = mlp()
    ref = Reference(model)
    opt = KSAM(model.parameters(), rho=RHO, k_frac=k_frac, m=m, **KW)
    for x, y in data:
        opt.step(make_closure(model, x, y))
        ws, hs = ref.ws, []
        for lo in range(0, x.shape[0], m):
            xc, yc = x[lo:lo + m], y[lo:lo + m]
            top = loss_and_grad(ref.model, ws, xc, yc)[0].topk(int(k_frac * m)).indices
            _, g = loss_and_grad(ref.model, ws, xc[top], yc[top])
            we = [w + e for w, e in zip(ws, sam_perturbation(ws, g, RHO))]
            hs.append(loss_and_grad(ref.model, we, xc[top], yc[top])[1])
        ref.step_with(mean_of(hs))
        assert opt.last_stats["sample_frac"] == 0.5
        assert_all_close(weights(model), ref.ws)


def test_aesam_m_perturbs_along_the_batch_gradient_and_selects_per_chunk():
    from esam.optim import AESAM

    m, gamma = 6, 0.5
    data = batches("mlp", 3, n=12)
    model = mlp()
    ref = Reference(model)
    # lambda = -10: every step sharpness-aware; inner ESAM(beta 1, gamma 0.5): SDS per chunk
    opt = AESAM(model.parameters(), lambda1=-10.0, lambda2=-10.0, inner="esam", beta=1.0, gamma=gamma, m=m,
                rho=RHO, **KW)
    for x, y in data:
        opt.step(make_closure(model, x, y))
        ws = ref.ws
        _, g = loss_and_grad(ref.model, ws, x, y)
        we = [w + e for w, e in zip(ws, sam_perturbation(ws, g, RHO))]  # one e, from the batch's g
        hs = []
        for lo in range(0, x.shape[0], m):
            xc, yc = x[lo:lo + m], y[lo:lo + m]
            rise = loss_and_grad(ref.model, we, xc, yc)[0] - loss_and_grad(ref.model, ws, xc, yc)[0]
            keep = rise.topk(int(gamma * m)).indices
            hs.append(loss_and_grad(ref.model, we, xc[keep], yc[keep])[1])
        ref.step_with(mean_of(hs))
        assert opt.last_stats["sam_step"] == 1.0
        assert_all_close(weights(model), ref.ws)


@pytest.mark.parametrize("bn_stats", ["first", "all"])
def test_switching_rules_run_their_inner_step_with_m_and_bn_stats_bit_for_bit(bn_stats):
    """Late-phase SAM from the start is SAM(m, bn_stats); RST at p = 1 is ESAM(m, bn_stats)."""
    from esam.optim import RST, LateSAM

    data = batches("convnet", 3, n=12)
    esam_kw = dict(beta=0.6, gamma=0.5, seed=3)
    pairs = [
        (lambda mod: LateSAM(mod.parameters(), start=0.0, rho=RHO, m=6, bn_stats=bn_stats, model=mod, **KW),
         lambda mod: SAM(mod.parameters(), rho=RHO, m=6, bn_stats=bn_stats, model=mod, **KW)),
        (lambda mod: RST(mod.parameters(), p=1.0, inner="esam", rho=RHO, m=6, bn_stats=bn_stats, model=mod,
                         **esam_kw, **KW),
         lambda mod: ESAM(mod.parameters(), rho=RHO, m=6, bn_stats=bn_stats, model=mod, **esam_kw, **KW)),
    ]
    for rule, plain in pairs:
        a, b = convnet(), convnet()
        run(rule, a, data), run(plain, b, data)
        assert_all_equal(weights(a), weights(b))
        assert_all_equal(list(a.buffers()), list(b.buffers()))


@pytest.mark.parametrize("name", ["looksam", "gsam", "ksam", "aesam"])
def test_m_equal_to_the_batch_is_m_none_for_every_sam_based_method(name):
    from esam.optim import build_optimizer

    data = batches("convnet", 4, n=12)
    extra = {"aesam": {"lambda1": -10.0, "lambda2": -10.0}, "looksam": {"k": 2}}.get(name, {})
    runs = []
    for m in (None, 12):
        model = convnet()
        opt = build_optimizer(name, model.parameters(), rho=RHO, m=m, model=model, **extra, **KW)
        for x, y in data:
            opt.step(make_closure(model, x, y))
        runs.append(weights(model) + list(model.buffers()))
    assert_all_equal(*runs)


@pytest.mark.parametrize("name", ["sam", "ksam", "looksam"])
def test_first_logits_cover_the_whole_batch_at_w_under_m(name):
    """The trainer's train accuracy reads closure.first_logits: with chunks, each row's logits at w."""
    from esam.optim import build_optimizer

    model = mlp()
    x, y = batches("mlp", 1, n=12)[0]
    with torch.no_grad():
        at_w = model(x)
    opt = build_optimizer(name, model.parameters(), rho=RHO, m=4, **KW)
    closure = make_closure(model, x, y)
    opt.step(closure)
    assert closure.first_logits.shape == at_w.shape
    torch.testing.assert_close(closure.first_logits, at_w, **TIGHT)
