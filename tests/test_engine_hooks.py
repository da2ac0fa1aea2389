"""What a method asks of the evaluation: MSAM's BatchNorm recalibration before the final test
(as MarlonBecker/MSAM main.py) and MESA's EMA model scored next to the raw one."""
from __future__ import annotations

import contextlib
import copy
import io
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import compose_cfg
from esam.engine import Trainer
from esam.engine.checkpoint import restore
from esam.errors import UserError
from esam.runtime import load_checkpoint

TINY = ["dataset=digits", "dataset.batch_size=32", "trainer.limit_train_batches=4", "trainer.limit_test_batches=2",
        "trainer.precision=fp32", "trainer.device=cpu", "trainer.num_threads=1", "trainer.progress=false",
        "trainer.timing_warmup_steps=1", "logger=none", "trainer.epochs=2"]


@pytest.fixture(autouse=True)
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def fit(cfg, run_dir):
    trainer = Trainer(cfg, run_dir)
    with contextlib.redirect_stdout(io.StringIO()):
        summary = trainer.fit()
    return trainer, summary


def bns(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def bn_stats_by_hand(model: nn.Module, batches) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each BN layer's running (mean, var) after one train-mode pass over ``batches``, computed in
    float64 from the layer inputs: r <- (1 - m) r + m * batch statistic (var unbiased), PyTorch's
    rule, starting from the model's current running statistics. The pass itself changes nothing."""
    probe = copy.deepcopy(model).train()
    layers = bns(probe)
    stats = [(b.running_mean.double().clone(), b.running_var.double().clone()) for b in layers]
    seen: list[torch.Tensor] = []
    handles = [b.register_forward_pre_hook(lambda mod, inp: seen.append(inp[0].detach().double()))
               for b in layers]
    for b in layers:
        b.momentum_by_hand, b.momentum = b.momentum, 0.0  # the probe's own running stats stay put
    with torch.no_grad():
        for x in batches:
            seen.clear()
            probe(x)
            for i, (b, inp) in enumerate(zip(layers, seen)):
                dims = [0] + list(range(2, inp.dim()))
                n = inp.numel() // inp.shape[1]
                mean = inp.mean(dims)
                var = inp.var(dims, unbiased=False) * n / (n - 1)
                m = b.momentum_by_hand
                stats[i] = ((1 - m) * stats[i][0] + m * mean, (1 - m) * stats[i][1] + m * var)
    for h in handles:
        h.remove()
    return stats


def training_images(run, epoch):
    return [x for i, (x, _y) in enumerate(run.data.train.batches(epoch)) if i < run.steps_per_epoch]


def test_msam_final_evaluation_uses_bn_statistics_recomputed_at_w(tmp_path):
    cfg = compose_cfg([*TINY, "optimizer=msam", "optimizer.rho=0.5"])
    trainer, summary = fit(cfg, tmp_path / "run")

    # The reference: the state the last epoch saved (perturbed weights, BN stats gathered there),
    # moved back to w; one pass by hand over the next epoch's training batches.
    ref = Trainer(cfg, tmp_path / "ref")
    restore(ref.run, load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt"))
    images = training_images(ref.run, epoch=2)
    at_perturbed = bn_stats_by_hand(ref.model, images)
    with ref.optimizer.evaluation_weights():
        at_w = bn_stats_by_hand(ref.model, images)

    got = [(b.running_mean.double(), b.running_var.double()) for b in bns(trainer.model)]
    assert len(got) == len(at_w) > 0
    for (gm, gv), (wm, wv) in zip(got, at_w):
        torch.testing.assert_close(gm, wm, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gv, wv, rtol=1e-5, atol=1e-6)
    # ... and not those of a pass at the perturbed weights the model holds between steps
    assert max((gm - pm).abs().max().item() for (gm, _), (pm, _) in zip(got, at_perturbed)) > 1e-4

    # Both numbers are in summary.json: after (the *_final numbers) and before the recalibration.
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    last = trainer.state.history[-1]
    assert on_disk["final_hooks"] == ["recalibrate_bn"]
    assert on_disk["test_acc_final_before_hooks"] == last["test_acc"]
    assert on_disk["test_acc_final"] == summary["test_acc_final"] == trainer.evaluate()["test_acc"]
    # the recalibrated weights are still w~ between steps: evaluation moves them back, as before
    with ref.optimizer.evaluation_weights():
        w = [p.detach().clone() for p in ref.model.parameters()]
    with trainer.optimizer.evaluation_weights():
        assert all(torch.equal(a, b) for a, b in zip(w, trainer.model.parameters()))
    # checkpoints/final.pt holds the model as finally evaluated: w and the recalibrated statistics
    final = load_checkpoint(tmp_path / "run" / "checkpoints" / "final.pt")
    assert final["test_acc"] == on_disk["test_acc_final"]
    probe = copy.deepcopy(ref.model)
    probe.load_state_dict(final["model"])
    assert all(torch.equal(a, b) for a, b in zip(w, probe.parameters()))
    assert all(torch.equal(b.running_mean, t.running_mean) and torch.equal(b.running_var, t.running_var)
               for b, t in zip(bns(probe), bns(trainer.model)))


def test_hooks_follow_the_method_unless_the_trainer_says_otherwise(tmp_path):
    _, sgd = fit(compose_cfg([*TINY, "optimizer=sgd", "trainer.epochs=1"]), tmp_path / "sgd")
    assert sgd["final_hooks"] == [] and "test_acc_final_before_hooks" not in sgd
    _, off = fit(compose_cfg([*TINY, "optimizer=msam", "trainer.epochs=1", "trainer.before_final_eval=[]"]),
                 tmp_path / "off")
    assert off["final_hooks"] == []
    trainer, on = fit(compose_cfg([*TINY, "optimizer=sgd", "trainer.epochs=1",
                                   "trainer.before_final_eval=[recalibrate_bn]"]), tmp_path / "on")
    assert on["final_hooks"] == ["recalibrate_bn"] and on["test_acc_final"] == trainer.evaluate()["test_acc"]


def test_unknown_hook_fails_before_training(tmp_path):
    with pytest.raises(UserError, match=r"trainer\.before_final_eval: unknown hook 'recalibrate'; allowed: "
                                        r"recalibrate_bn"):
        Trainer(compose_cfg([*TINY, "optimizer=msam", "trainer.before_final_eval=[recalibrate]"]), tmp_path)


def test_mesa_logs_the_ema_models_test_accuracy_next_to_the_raw_models(tmp_path):
    trainer, summary = fit(compose_cfg([*TINY, "optimizer=mesa", "optimizer.start=0", "optimizer.decay=0.9"]),
                           tmp_path)
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all({"test_acc", "test_acc_ema", "test_loss_ema", "test_acc5_ema"} <= set(r) for r in lines)

    # By hand: a copy of the model holding the EMA's parameters and buffers, in eval mode.
    ema_model = copy.deepcopy(trainer.model).eval()
    ema_model.load_state_dict({**ema_model.state_dict(), **trainer.optimizer.ema})
    correct = n = 0
    loss = 0.0
    with torch.no_grad():
        for b, (x, y) in enumerate(trainer.run.data.test.batches(0)):
            if b >= 2:
                break
            logits = ema_model(x)
            correct += int((logits.argmax(1) == y).sum())
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
            n += y.shape[0]
    assert lines[-1]["test_acc_ema"] == pytest.approx(100.0 * correct / n, abs=1e-9)
    assert lines[-1]["test_loss_ema"] == pytest.approx(loss / n, rel=1e-9)
    assert lines[-1]["test_acc_ema"] != lines[-1]["test_acc"] or lines[-1]["test_loss_ema"] != lines[-1]["test_loss"]
    assert summary["test_acc_ema_final"] == lines[-1]["test_acc_ema"]
    assert summary["test_acc_ema_best"] == max(r["test_acc_ema"] for r in lines)
    assert summary["test_acc_final"] == lines[-1]["test_acc"]  # the raw model's stays the headline


def test_ema_evaluation_can_be_switched_off(tmp_path):
    fit(compose_cfg([*TINY, "optimizer=mesa", "trainer.epochs=1", "trainer.evaluate_variants=false"]), tmp_path)
    line = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert "test_acc_ema" not in line


def test_the_epoch_line_shows_the_ema_accuracy_beside_the_models():
    from esam.engine.run_files import epoch_line

    record = {"epoch": 3, "lr": 0.05, "train_loss": 1.0, "train_acc": 60.0, "test_loss": 1.1, "test_acc": 55.0,
              "test_acc5": 90.0, "train_img_per_s": 100.0, "epoch_time_s": 2.0, "test_acc_ema": 57.25,
              "test_acc5_ema": 91.0, "test_loss_ema": 1.05}
    line = epoch_line(record, 10)
    assert "test loss 1.1000 acc 55.00" in line and line.endswith("ema acc 57.25")
