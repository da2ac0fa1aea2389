"""RST (Zhao et al., 2022): a Bernoulli(p_t) draw per step picks SAM or SGD; hand-computed in float64."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from esam.optim import METHODS, RST
from helpers import CountingClosure, save_load, train_digits
from helpers import (LR, MOMENTUM, RHO, WD, Reference, assert_all_close, assert_all_equal, batches,
                     convnet, loss_and_grad, mlp, sam_perturbation, weights)

KW = dict(lr=LR, momentum=MOMENTUM, weight_decay=WD)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_each_step_is_the_hand_computed_sam_or_sgd_step_the_draw_picked():
    model = mlp()
    ref = Reference(model)
    opt = RST(model.parameters(), "sgd", p=0.5, rho=RHO, seed=0, **KW)
    picked = []
    for t, (x, y) in enumerate(batches("mlp", 8)):
        opt.set_progress(t, 8)
        closure = CountingClosure(model, x, y)
        opt.step(closure)
        sam = opt.last_stats["sam_step"] == 1.0
        picked.append(sam)

        w = ref.ws
        _, g = loss_and_grad(ref.model, w, x, y)
        if sam:
            w_e = [wi + ei for wi, ei in zip(w, sam_perturbation(w, g, RHO))]
            ref.step_with(loss_and_grad(ref.model, w_e, x, y)[1])
            assert_all_close(closure.seen[1], w_e)
        else:
            ref.step_with(g)
        assert closure.passes == ((2, 2) if sam else (1, 1))  # an SGD step: one forward, one backward
        assert opt.last_cost == (6.0 if sam else 3.0)
        assert_all_close(weights(model), ref.ws)
    assert any(picked) and not all(picked), "the draws never mixed: the test checked one branch only"


def draws(opt: RST, steps: int, total: int | None = None) -> list[bool]:
    """The rule's decisions alone (no passes), at progress t / total."""
    out = []
    for t in range(steps):
        opt.set_progress(t, total or steps)
        out.append(opt._sam_now())
    return out


def tiny(**kw) -> RST:
    return RST(nn.Linear(2, 1).parameters(), "sgd", lr=LR, **kw)


@pytest.mark.parametrize("p", [0.2, 0.5, 0.9])
def test_constant_p_is_the_share_of_sam_steps(p):
    n = 2000
    share = sum(draws(tiny(p=p, seed=1), n)) / n
    assert abs(share - p) < 4 * math.sqrt(p * (1 - p) / n)  # 4 standard deviations


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_scheduled_p_moves_from_p_to_p_end(schedule):
    opt = tiny(schedule=schedule, p=0.1, p_end=0.9, seed=2)
    assert opt.probability(0.0) == pytest.approx(0.1) and opt.probability(1.0) == pytest.approx(0.9)
    assert opt.probability(0.5) == pytest.approx(0.5)
    if schedule == "cosine":
        assert opt.probability(0.25) == pytest.approx(0.9 + (0.1 - 0.9) * (1 + math.cos(math.pi / 4)) / 2)
    else:
        assert opt.probability(0.25) == pytest.approx(0.3)
    d = draws(opt, 2000)
    assert sum(d[:500]) < sum(d[-500:])  # SAM grows frequent as p_t rises


def test_draws_follow_the_seed_not_the_global_rng():
    torch.manual_seed(1)
    a = draws(tiny(p=0.5, seed=4), 64)
    torch.manual_seed(2)
    b = draws(tiny(p=0.5, seed=4), 64)
    assert a == b
    assert a != draws(tiny(p=0.5, seed=5), 64)


def test_expected_cost_is_sgd_plus_p_times_the_sam_extra():
    info = METHODS["rst"]
    assert info.expected_cost() == pytest.approx(3 + 0.5 * 3)
    assert info.expected_cost(p=0.2) == pytest.approx(3 + 0.2 * 3)
    assert info.expected_cost(schedule="linear", p=0.0, p_end=1.0) == pytest.approx(4.5)
    assert info.expected_cost(p=1.0, inner="esam", beta=0.6, gamma=0.5) == pytest.approx(1 + 1.6 + 1 + 1.5)


@pytest.mark.parametrize("inside_evaluation", [True, False])
def test_state_dict_round_trip_resumes_draws_and_weights_bit_for_bit(inside_evaluation):
    data, total = batches("convnet", 8), 8
    kw = dict(schedule="linear", p=0.2, p_end=0.8, inner="esam", beta=0.5, gamma=0.5, rho=RHO, **KW)

    def run(model, opt, steps):
        out = []
        for t in steps:
            opt.set_progress(t, total)
            opt.step(CountingClosure(model, *data[t]))
            out.append(opt.last_stats["sam_step"])
        return out

    model = convnet()
    opt = RST(model.parameters(), "sgd", model=model, seed=1, **kw)
    run(model, opt, range(4))
    saved = save_load(model, opt, inside_evaluation=inside_evaluation)
    straight = run(model, opt, range(4, 8))

    fresh = convnet(seed=5)
    fresh.load_state_dict(saved["model"])
    fresh_opt = RST(fresh.parameters(), "sgd", model=fresh, seed=99, **kw)  # the saved draws win
    fresh_opt.load_state_dict(saved["opt"])
    assert run(fresh, fresh_opt, range(4, 8)) == straight
    assert_all_equal(weights(fresh), weights(model))
    assert_all_equal(list(fresh.buffers()), list(model.buffers()))


@pytest.mark.parametrize("kwargs,key", [
    ({"p": -0.1}, "p"), ({"p": 1.5}, "p"), ({"p": float("nan")}, "p"),
    ({"schedule": "step"}, "schedule"), ({"schedule": "linear"}, "p_end"),
    ({"schedule": "constant", "p_end": 0.9}, "p_end"), ({"schedule": "cosine", "p_end": 2.0}, "p_end"),
    ({"inner": "msam"}, "inner"), ({"beta": 0.0}, "beta"), ({"rho": -1.0}, "rho"),
])
def test_bad_arguments_raise_value_error_naming_them(kwargs, key):
    with pytest.raises(ValueError, match=key):
        RST(mlp().parameters(), "sgd", lr=LR, **kwargs)


def test_trains_through_the_shared_trainer(tmp_path):
    rows = train_digits("rst", tmp_path / "run", "optimizer.p=1.0")
    assert rows[-1]["method_sam_step"] == 1.0 and rows[-1]["method_sharpness"] != 0.0


@pytest.mark.ddp
def test_ddp_ranks_draw_alike_though_seeded_apart(tmp_path):
    """The trainer seeds each rank differently (ESAM's SWP); RST's draws must still agree, or
    one rank would run a second pass the other never joins."""
    from helpers import ddp_decisions

    r0, r1 = ddp_decisions(tmp_path, "rst", p=0.5, rho=RHO, **KW)
    assert r0["decisions"] == r1["decisions"] and 0 < sum(r0["decisions"]) < len(r0["decisions"])
    assert_all_equal(r0["weights"], r1["weights"])


def test_grad_scaler_step_equals_unscaled_step():
    from helpers import scaled_equals_unscaled

    scaled_equals_unscaled(lambda m: RST(m.parameters(), "sgd", p=0.5, rho=RHO, seed=0, **KW), mlp,
                           batches("mlp", 6))
