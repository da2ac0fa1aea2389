"""SAF and MESA (Du et al., NeurIPS 2022) against their losses computed by hand in float64.

The references below use torch.autograd.grad on a functional copy of the model, a plain
torch.optim.SGD and an explicit softmax/KL; none of them calls esam.optim.saf.
"""
from __future__ import annotations

import copy
import io
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from esam.errors import UserError
from esam.optim import METHODS, build_optimizer, make_closure
from esam.optim.saf import MESA, SAF
from helpers import LR, MOMENTUM, TIGHT, WD, Reference, assert_all_close, convnet, free_port, mlp, two_ranks, weights

N, B = 8, 4  # 8 samples, two batches of 4 per epoch


pytestmark = pytest.mark.usefixtures("one_thread")


def dataset(kind: str = "mlp"):
    g = torch.Generator().manual_seed(7)
    shape = (N, 6) if kind == "mlp" else (N, 2, 5, 5)
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randint(3, (N,), generator=g)


def schedule(epochs: int, drop: int | None = None) -> list[tuple[int, torch.Tensor]]:
    """(epoch, sample ids) per step: a fresh permutation each epoch, two batches; ``drop`` is left
    out of epoch 0 (as drop_last would), so it has no stored logits two epochs later."""
    steps = []
    for e in range(epochs):
        order = torch.randperm(N, generator=torch.Generator().manual_seed(100 + e))
        if e == 0 and drop is not None:
            order = order[order != drop]
        steps += [(e, order[:B]), (e, order[B:])]
    return steps


def softmax_kl(target_logits: torch.Tensor, logits: torch.Tensor, tau: float) -> torch.Tensor:
    """tau^2 * sum_k p_k (log p_k - log q_k), p = softmax(target/tau), q = softmax(logits/tau), per row."""
    p = torch.softmax(target_logits / tau, dim=-1)
    q = torch.softmax(logits / tau, dim=-1)
    return tau ** 2 * (p * (p.log() - q.log())).sum(-1)


def forward(model, ws, x, buffers=None):
    names = [n for n, _ in model.named_parameters()]
    leaves = [w.detach().clone().requires_grad_(True) for w in ws]
    state = dict(zip(names, leaves))
    if buffers is not None:
        state.update(buffers)
    return leaves, functional_call(model, state, (x,))


# -- SAF ---------------------------------------------------------------------------------------
def test_saf_matches_the_papers_loss_with_its_memory_and_switch_on():
    lam, tau, start, lookback = 0.3, 2.0, 1, 2
    x_all, y_all = dataset()
    model = mlp()
    ref = Reference(model)
    opt = SAF(model.parameters(), "sgd", lam=lam, tau=tau, start=start, lookback=lookback,
              lr=LR, momentum=MOMENTUM, weight_decay=WD)
    past: dict[tuple[int, int], torch.Tensor] = {}  # (epoch, sample) -> logits seen in that epoch
    steps = schedule(6, drop=7)
    on_epochs, shares = set(), []
    for t, (epoch, ids) in enumerate(steps):
        x, y = x_all[ids], y_all[ids]
        opt.set_progress(epoch + (t % 2) / 2, 6)
        out = opt.step(make_closure(model, x, y, sample_ids=ids))

        leaves, z = forward(ref.model, ref.ws, x)
        ce = F.cross_entropy(z, y, reduction="none")
        loss, traj, share = ce.mean(), torch.tensor(0.0, dtype=torch.float64), 0.0
        if epoch > start:  # the authors' `epoch > kl_start_epoch`
            have = [(epoch - lookback, i) in past for i in ids.tolist()]
            terms = [softmax_kl(past[(epoch - lookback, i)], z[r], tau)
                     for r, i in enumerate(ids.tolist()) if have[r]]
            traj = sum(terms) / len(ids) if terms else traj  # mean over the whole batch
            share = sum(have) / len(ids)
            shares.append(share)
            loss = loss + lam * traj
            on_epochs.add(epoch)
        for r, i in enumerate(ids.tolist()):
            past[(epoch, i)] = z[r].detach()
        ref.step_with(torch.autograd.grad(loss, leaves))

        torch.testing.assert_close(out, ce.detach(), **TIGHT)
        torch.testing.assert_close(opt.last_stats["traj_loss"], traj.detach(), **TIGHT)
        assert float(opt.last_stats["traj_share"]) == pytest.approx(share)
        assert opt.last_cost == 3.0
        assert_all_close(weights(model), ref.ws)
    assert on_epochs == {2, 3, 4, 5}
    assert sorted(shares)[:2] == [0.75, 1.0]  # sample 7, unseen in epoch 0, had no target in epoch 2
    assert opt.memory.shape == (N, lookback + 1, 3) and opt.memory.dtype == torch.float64


def test_saf_before_any_stored_epoch_is_plain_sgd():
    """start < lookback: the loss is on, but there is nothing from `lookback` epochs ago yet."""
    x_all, y_all = dataset()
    runs = []
    for cls_kw in ({"start": 0, "lookback": 3}, None):
        model = mlp()
        opt = (SAF(model.parameters(), "sgd", lr=LR, momentum=MOMENTUM, weight_decay=WD, **cls_kw)
               if cls_kw else torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD))
        for t, (epoch, ids) in enumerate(schedule(3)):
            if cls_kw:
                opt.set_progress(epoch + (t % 2) / 2, 3)
                opt.step(make_closure(model, x_all[ids], y_all[ids], sample_ids=ids))
            else:
                opt.zero_grad()
                F.cross_entropy(model(x_all[ids]), y_all[ids]).backward()
                opt.step()
        runs.append(weights(model))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_saf_needs_sample_ids_and_logits_from_the_closure():
    model = mlp()
    opt = SAF(model.parameters(), lr=LR)
    x, y = dataset()
    with pytest.raises(ValueError, match="sample_ids"):
        opt.step(make_closure(model, x, y))

    def losses_only(indices=None):
        return F.cross_entropy(model(x), y, reduction="none")
    with pytest.raises(ValueError, match="return_logits"):
        opt.step(losses_only)
    assert SAF.needs_sample_ids and not getattr(MESA, "needs_sample_ids", False)


def test_saf_memory_size_and_growth():
    model = mlp()
    x, y = dataset()
    grown = SAF(model.parameters(), lr=LR, lookback=2)
    grown.set_progress(0, 1)
    grown.step(make_closure(model, x[:4], y[:4], sample_ids=torch.tensor([0, 1, 2, 3])))
    assert grown.memory.shape == (4, 3, 3)  # N x (E~ + 1) x classes, N = largest id so far + 1
    grown.step(make_closure(model, x[4:], y[4:], sample_ids=torch.tensor([4, 5, 6, 9])))
    assert grown.memory.shape == (10, 3, 3) and grown.written[:, 0].tolist() == [0] * 7 + [-1, -1, 0]
    fixed = SAF(model.parameters(), lr=LR, num_samples=50, memory_device="device")
    fixed.set_progress(0, 1)
    fixed.step(make_closure(model, x, y, sample_ids=torch.arange(N)))
    assert fixed.memory.shape == (50, 4, 3) and fixed.memory.device == x.device


def _resume(cls, model_fn, kind: str, kw: dict, epochs: int, cut: int, **step_kw):
    """Straight run vs a run saved after step ``cut`` through a file and resumed in a fresh optimizer."""
    x_all, y_all = dataset(kind)
    steps = schedule(epochs)

    def run(opt, model, part):
        for t, (epoch, ids) in part:
            opt.set_progress(epoch + (t % 2) / 2, epochs)
            opt.step(make_closure(model, x_all[ids], y_all[ids], sample_ids=ids))

    model = model_fn()
    opt = cls(model.parameters(), model=model, seed=1, **kw)
    run(opt, model, list(enumerate(steps)))
    straight = weights(model) + [b.clone() for b in model.buffers()]

    model = model_fn()
    opt = cls(model.parameters(), model=model, seed=1, **kw)
    run(opt, model, list(enumerate(steps))[:cut])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    model2 = model_fn()
    model2.load_state_dict(saved["model"])
    opt2 = cls(model2.parameters(), model=model2, seed=99, **kw)
    opt2.load_state_dict(saved["opt"])
    run(opt2, model2, list(enumerate(steps))[cut:])
    for a, b in zip(weights(model2) + list(model2.buffers()), straight):
        assert torch.equal(a, b)
    return opt2


def test_saf_state_dict_round_trip_resumes_bit_for_bit():
    kw = dict(lr=LR, momentum=MOMENTUM, weight_decay=WD, start=1, lookback=2)
    opt = _resume(SAF, mlp, "mlp", kw, epochs=5, cut=5)  # cut inside epoch 2, the loss already on
    assert float(opt.last_stats["traj_loss"]) > 0


# -- MESA --------------------------------------------------------------------------------------
def test_mesa_matches_the_papers_loss_with_an_ema_model_in_eval_mode():
    lam, tau, start, decay = 0.8, 2.0, 0, 0.9
    x_all, y_all = dataset("convnet")
    model = convnet()
    ref = Reference(model)
    opt = MESA(model.parameters(), "sgd", lam=lam, tau=tau, start=start, decay=decay, model=model,
               lr=LR, momentum=MOMENTUM, weight_decay=WD)
    float_buffers = {n: b for n, b in ref.model.named_buffers() if b.is_floating_point()}
    ema = {n: w.clone() for n, w in zip([n for n, _ in ref.model.named_parameters()], ref.ws)}
    ema.update({n: b.clone() for n, b in float_buffers.items()})
    for t, (epoch, ids) in enumerate(schedule(3)):
        x, y = x_all[ids], y_all[ids]
        opt.set_progress(epoch + (t % 2) / 2, 3)
        closure = make_closure(model, x, y)
        out = opt.step(closure)

        leaves, z = forward(ref.model, ref.ws, x)  # train mode: batch statistics, running stats move
        ce = F.cross_entropy(z, y, reduction="none")
        loss, traj = ce.mean(), torch.tensor(0.0, dtype=torch.float64)
        if epoch > start:
            ema_model = copy.deepcopy(ref.model).eval()  # eval mode: the EMA's running statistics
            with torch.no_grad():
                z_ema = functional_call(ema_model, ema, (x,))
            traj = softmax_kl(z_ema, z, tau).mean()
            loss = loss + lam * traj
        ref.step_with(torch.autograd.grad(loss, leaves))
        live = dict(zip([n for n, _ in ref.model.named_parameters()], ref.ws))
        live.update(float_buffers)
        ema = {n: decay * ema[n] + (1 - decay) * live[n] for n in ema}  # after every step

        torch.testing.assert_close(out, ce.detach(), **TIGHT)
        torch.testing.assert_close(closure.first_logits, z.detach(), **TIGHT)  # accuracy reads w's
        torch.testing.assert_close(opt.last_stats["traj_loss"], traj.detach(), **TIGHT)
        assert opt.last_cost == (4.0 if epoch > start else 3.0)
        assert all(m.training for m in model.modules())
        assert_all_close(weights(model), ref.ws)
        assert_all_close(list(b for b in model.buffers() if b.is_floating_point()), list(float_buffers.values()))
        assert_all_close([opt.ema[n] for n in ema], list(ema.values()))


def test_mesa_needs_the_model():
    model = mlp()
    opt = MESA(model.parameters(), lr=LR)
    x, y = dataset()
    with pytest.raises(ValueError, match="model="):
        opt.step(make_closure(model, x, y))


def test_mesa_state_dict_round_trip_resumes_bit_for_bit():
    kw = dict(lr=LR, momentum=MOMENTUM, weight_decay=WD, start=0, decay=0.9)
    opt = _resume(MESA, convnet, "convnet", kw, epochs=3, cut=3)
    assert opt.last_cost == 4.0


# -- both --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,key,value", [
    ("saf", "lam", -0.1), ("saf", "tau", 0.0), ("saf", "start", -1), ("saf", "start", 1.5),
    ("saf", "lookback", 0), ("saf", "lookback", True), ("saf", "num_samples", 0),
    ("saf", "memory_device", "gpu"), ("mesa", "decay", 1.5), ("mesa", "decay", -0.1),
    ("mesa", "lam", float("nan")), ("mesa", "tau", -5.0),
])
def test_bad_arguments_name_the_key(name, key, value):
    with pytest.raises(UserError, match=f"optimizer {name}: {key} must be"):
        build_optimizer(name, mlp().parameters(), lr=LR, **{key: value})


def test_registry_entries_carry_the_papers_defaults():
    assert METHODS["saf"].hparams == {"lam": 0.3, "tau": 5.0, "start": 5, "lookback": 3, "num_samples": None,
                                      "memory_device": "cpu"}
    assert METHODS["mesa"].hparams == {"lam": 0.8, "tau": 5.0, "start": 5, "decay": 0.9998}
    assert METHODS["saf"].expected_cost() == 3.0 and METHODS["mesa"].expected_cost() == 4.0


# -- DDP: SAF's memory gathers every rank's outputs; MESA's EMA pass runs through the DDP model --


DDP_KW = {"saf": dict(start=1, lookback=2), "mesa": dict(start=0, decay=0.9)}


def _ddp_rank(rank: int, world: int, port: int, name: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = mlp()  # no BatchNorm: the ranks' halves together are the one-process batch
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = build_optimizer(name, model.parameters(), model=ddp, lr=LR, momentum=MOMENTUM, weight_decay=WD,
                          **DDP_KW[name])
    x_all, y_all = dataset()
    shares = []
    for t, (epoch, ids) in enumerate(schedule(4)):
        mine = ids[rank * B // world:(rank + 1) * B // world]  # which rank sees a sample changes per epoch
        opt.set_progress(epoch + (t % 2) / 2, 4)
        opt.step(make_closure(ddp, x_all[mine], y_all[mine], sample_ids=mine))
        shares.append(float(opt.last_stats["traj_share"]))
    torch.save({"weights": weights(model), "shares": shares}, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


@pytest.mark.ddp
@pytest.mark.parametrize("name", ["saf", "mesa"])
def test_ddp_ranks_equal_one_process_on_the_whole_batch(tmp_path, name):
    out = str(tmp_path / "ddp.pt")
    two_ranks().spawn(_ddp_rank, (2, free_port(), name, out))
    rank0, rank1 = torch.load(f"{out}.0"), torch.load(f"{out}.1")
    for a, b in zip(rank0["weights"], rank1["weights"]):
        assert torch.equal(a, b)
    # Every sample had its target on every rank once the loss was on (the gathered memory).
    assert rank0["shares"] == rank1["shares"] == [0.0] * (4 if name == "saf" else 2) + [1.0] * (4 if name == "saf" else 6)
    model = mlp()
    opt = build_optimizer(name, model.parameters(), model=model, lr=LR, momentum=MOMENTUM, weight_decay=WD,
                          **DDP_KW[name])
    x_all, y_all = dataset()
    for t, (epoch, ids) in enumerate(schedule(4)):
        opt.set_progress(epoch + (t % 2) / 2, 4)
        opt.step(make_closure(model, x_all[ids], y_all[ids], sample_ids=ids))
    assert_all_close(rank0["weights"], weights(model), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("name", ["saf", "mesa"])
def test_bf16_autocast_keeps_memory_and_loss_in_fp32(name):
    model = mlp(dtype=torch.float32)
    opt = build_optimizer(name, model.parameters(), model=model, lr=LR, start=0, **({"lookback": 1} if name == "saf" else {}))
    x_all, y_all = dataset()
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    for t, (epoch, ids) in enumerate(schedule(2)):
        opt.set_progress(epoch + (t % 2) / 2, 2)
        opt.step(make_closure(model, x_all[ids].float(), y_all[ids], sample_ids=ids, autocast=autocast))
        assert opt.last_stats["traj_loss"].dtype == torch.float32
    assert float(opt.last_stats["traj_loss"]) > 0 and all(torch.isfinite(p).all() for p in model.parameters())
    if name == "saf":
        assert opt.memory.dtype == torch.float32
