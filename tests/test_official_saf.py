"""SAF and MESA against the authors' training loops (AngusDujw/SAF, SAF_train.py and MESA_train.py
train_one_epoch, with timm's ModelEmaV2 for MESA's EMA), re-written here in float64 over several
epochs of a tiny data set (their SAF memory is float32; here float64, so that the comparison is
tight)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from esam.optim import build_optimizer, make_closure
from helpers.official import MODELS, assert_same

LR, MOMENTUM, WD = 0.1, 0.9, 5e-4
N, B, EPOCHS = 24, 8, 7  # 3 steps per epoch

pytestmark = pytest.mark.usefixtures("one_thread")


def dataset(kind: str):
    g = torch.Generator().manual_seed(7)
    shape = (N, 6) if kind == "mlp" else (N, 2, 5, 5)
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randint(3, (N,), generator=g)


def epoch_batches(epoch: int):
    order = torch.randperm(N, generator=torch.Generator().manual_seed(100 + epoch))
    return [order[i:i + B] for i in range(0, N, B)]


def their_kl(output, targets, temperature):
    """F.kl_div(F.softmax(output/T).log(), F.softmax(targets/T), reduction='none').sum(-1).mean() * T^2."""
    return F.kl_div(F.softmax(output / temperature, dim=-1).log(), F.softmax(targets / temperature, dim=-1),
                    reduction="none").sum(-1).mean() * temperature ** 2


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)


@pytest.mark.parametrize("kind", ["mlp", "convnet"])
def test_saf_equals_the_authors_loop(kind):
    lam, tau, start, lookback = 0.3, 5.0, 2, 2
    x_all, y_all = dataset(kind)
    model = MODELS[kind]()
    theirs = copy.deepcopy(model)
    base = sgd(theirs)
    train_logits = torch.zeros(N, lookback + 1, 3, dtype=torch.float64)  # their np.zeros memory
    opt = build_optimizer("saf", model.parameters(), base_optimizer="sgd", lr=LR, momentum=MOMENTUM,
                          weight_decay=WD, lam=lam, tau=tau, start=start, lookback=lookback,
                          memory_device="cpu", model=model)
    for epoch in range(EPOCHS):
        for i, idx in enumerate(epoch_batches(epoch)):
            x, y = x_all[idx], y_all[idx]
            # theirs: record the logits first, then read those of `lookback` epochs ago
            output = theirs(x)
            train_logits[idx, epoch % (lookback + 1)] = output.detach()
            loss = F.cross_entropy(output, y)
            if epoch > start:
                loss = loss + lam * their_kl(output, train_logits[idx, (epoch - lookback) % (lookback + 1)], tau)
            base.zero_grad()
            loss.backward()
            base.step()
            # ours
            opt.set_progress(epoch + i / 3, EPOCHS)
            opt.step(make_closure(model, x, y, sample_ids=idx))
            assert_same(model, theirs)
            assert (float(opt.last_stats["traj_loss"]) > 0) == (epoch > start)


def test_mesa_equals_the_authors_loop_with_timms_ema():
    """MESA_train.py: ema_output = model_ema.module(input) (no grad; ModelEmaV2 keeps its copy in
    eval mode), output = model(input), loss = CE + lam KL(ema_output) in epochs > start; the SGD
    step; then model_ema.update(model): every float entry of the state dict (weights and BN
    running statistics) <- decay * ema + (1 - decay) * model."""
    lam, tau, start, decay = 0.8, 5.0, 1, 0.7
    x_all, y_all = dataset("convnet")
    model = MODELS["convnet"]()
    theirs = copy.deepcopy(model)
    base = sgd(theirs)
    ema = copy.deepcopy(theirs).eval()  # created before training, as their script does
    opt = build_optimizer("mesa", model.parameters(), base_optimizer="sgd", lr=LR, momentum=MOMENTUM,
                          weight_decay=WD, lam=lam, tau=tau, start=start, decay=decay, model=model)
    for epoch in range(EPOCHS):
        for i, idx in enumerate(epoch_batches(epoch)):
            x, y = x_all[idx], y_all[idx]
            with torch.no_grad():
                ema_output = ema(x)
            output = theirs(x)
            loss = F.cross_entropy(output, y)
            if epoch > start:
                loss = loss + lam * their_kl(output, ema_output, tau)
            base.zero_grad()
            loss.backward()
            base.step()
            with torch.no_grad():
                live = theirs.state_dict()
                for name, e in ema.state_dict().items():
                    if e.is_floating_point():
                        e.copy_(decay * e + (1.0 - decay) * live[name])

            opt.set_progress(epoch + i / 3, EPOCHS)
            opt.step(make_closure(model, x, y))
            assert_same(model, theirs)
    # the EMA itself, which the trainer evaluates as test_acc_ema
    with opt.evaluation_variants()["ema"]():
        ema_state = {n: t.detach().clone() for n, t in model.state_dict().items() if t.is_floating_point()}
    for name, t in ema.state_dict().items():
        if t.is_floating_point():
            torch.testing.assert_close(ema_state[name], t, rtol=1e-10, atol=1e-12)
    live = model.state_dict()
    assert max((ema_state[n] - live[n]).abs().max().item() for n in ema_state) > 1e-4  # not the raw weights
