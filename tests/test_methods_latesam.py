"""Late-phase SAM (Zhou et al., ICLR 2025) against SGD/SAM steps computed by hand in float64."""
from __future__ import annotations

import pytest
import torch

from esam.optim import ESAM, METHODS, SAM, SGD, LateSAM
from helpers import CountingClosure, save_load, train_digits
from helpers import (LR, MOMENTUM, RHO, WD, Reference, assert_all_close, assert_all_equal, batches,
                     convnet, loss_and_grad, mlp, sam_perturbation, weights)

KW = dict(lr=LR, momentum=MOMENTUM, weight_decay=WD)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_sgd_before_start_then_sam_matches_hand_computed_steps():
    start, total = 0.5, 6
    model = mlp()
    ref = Reference(model)
    opt = LateSAM(model.parameters(), "sgd", start=start, rho=RHO, **KW)
    for t, (x, y) in enumerate(batches("mlp", total)):
        opt.set_progress(t, total)
        closure = CountingClosure(model, x, y)
        out = opt.step(closure)

        w = ref.ws
        losses_w, g = loss_and_grad(ref.model, w, x, y)
        sam = t / total >= start
        if sam:
            w_e = [wi + ei for wi, ei in zip(w, sam_perturbation(w, g, RHO))]
            losses_e, g_e = loss_and_grad(ref.model, w_e, x, y)
            ref.step_with(g_e)
            assert_all_close(closure.seen[1], w_e)
            torch.testing.assert_close(opt.last_stats["sharpness"], (losses_e - losses_w).mean())
        else:
            ref.step_with(g)
            assert opt.last_stats["sharpness"] == 0.0
        # a plain step is one forward and one backward, no more
        assert closure.passes == ((2, 2) if sam else (1, 1))
        assert opt.last_stats["sam_step"] == float(sam)
        assert opt.last_cost == (6.0 if sam else 3.0)
        torch.testing.assert_close(out, losses_w)
        assert_all_close(weights(model), ref.ws)


def test_start_zero_is_esam_and_start_one_is_sgd_bit_for_bit():
    data = batches("convnet", 4)
    kw = dict(rho=RHO, beta=0.5, gamma=0.5, seed=3, **KW)
    runs = {}
    for name, make in {
        "late0": lambda m: LateSAM(m.parameters(), "sgd", start=0.0, inner="esam", model=m, **kw),
        "esam": lambda m: ESAM(m.parameters(), "sgd", model=m, **kw),
        "late1": lambda m: LateSAM(m.parameters(), "sgd", start=1.0, inner="esam", model=m, **kw),
        "sgd": lambda m: SGD(m.parameters(), "sgd", model=m, **KW),
    }.items():
        model = convnet()
        opt = make(model)
        for t, (x, y) in enumerate(data):
            opt.set_progress(t, len(data))
            opt.step(CountingClosure(model, x, y))
        runs[name] = (weights(model), list(model.buffers()))
    for a, b in (("late0", "esam"), ("late1", "sgd")):
        assert_all_equal(runs[a][0], runs[b][0])
        assert_all_equal(runs[a][1], runs[b][1])


def test_the_rule_holds_its_inner_step_on_its_own_base_optimizer():
    opt = LateSAM(mlp().parameters(), "sgd", inner="sam", beta=0.3, gamma=0.2, lr=LR)
    assert type(opt.inner) is SAM  # beta and gamma take no part
    assert opt.inner.base_optimizer is opt.base_optimizer and opt.inner.param_groups is opt.param_groups
    opt = LateSAM(mlp().parameters(), "sgd", inner="esam", beta=0.3, gamma=0.2, lr=LR)
    assert type(opt.inner) is ESAM and (opt.inner.beta, opt.inner.gamma) == (0.3, 0.2)


def test_expected_cost_is_sgd_then_the_inner_step():
    info = METHODS["latesam"]
    assert info.expected_cost(start=0.75) == pytest.approx(3 + 0.25 * 3)
    assert info.expected_cost(start=0.5, inner="esam", beta=0.6, gamma=0.5) == pytest.approx(
        3 + 0.5 * ((1 + 1.6 + 1 + 1.5) - 3))
    assert info.expected_cost(start=0.0) == 6.0 and info.expected_cost(start=1.0) == 3.0


def test_state_dict_round_trip_resumes_bit_for_bit():
    data, total = batches("convnet", 6), 6
    kw = dict(start=0.5, inner="esam", rho=RHO, beta=0.5, gamma=0.5, **KW)

    def run(model, opt, steps):
        for t in steps:
            opt.set_progress(t, total)
            opt.step(CountingClosure(model, *data[t]))

    model = convnet()
    opt = LateSAM(model.parameters(), "sgd", model=model, seed=1, **kw)
    run(model, opt, range(3))
    saved = save_load(model, opt)
    run(model, opt, range(3, 6))

    fresh = convnet(seed=5)
    fresh.load_state_dict(saved["model"])
    fresh_opt = LateSAM(fresh.parameters(), "sgd", model=fresh, seed=99, **kw)
    fresh_opt.load_state_dict(saved["opt"])
    run(fresh, fresh_opt, range(3, 6))
    assert_all_equal(weights(fresh), weights(model))
    assert_all_equal(list(fresh.buffers()), list(model.buffers()))


@pytest.mark.parametrize("kwargs,key", [
    ({"start": -0.1}, "start"), ({"start": 1.5}, "start"), ({"start": "late"}, "start"),
    ({"inner": "looksam"}, "inner"), ({"beta": 0.0}, "beta"), ({"gamma": 1.5}, "gamma"),
    ({"rho": -1.0}, "rho"),
])
def test_bad_arguments_raise_value_error_naming_them(kwargs, key):
    with pytest.raises(ValueError, match=key):
        LateSAM(mlp().parameters(), "sgd", lr=LR, **kwargs)


def test_trains_through_the_shared_trainer(tmp_path):
    rows = train_digits("latesam", tmp_path / "run", "optimizer.start=0.5")
    # progress 0, .2, .4, .6, .8 over the 5 steps: the last two are SAM steps
    assert rows[-1]["method_sam_step"] == pytest.approx(0.4)
    assert rows[-1]["method_sharpness"] != 0.0
