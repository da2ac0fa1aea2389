"""The trainer's step never waits for the device, and the deferred non-finite check still stops
the run within trainer.check_every steps with the last good checkpoint kept.

What a CUDA step would wait on is a host read of a device value: ``Tensor.item``, ``bool(t)``,
``t.tolist()``, ``float(t)``, ``int(t)``, ``t.numpy()``, ``t.cpu()`` and ``torch.cuda.synchronize``.
The step code is the same on CPU and CUDA except the step timer (CUDA events there, tested in
test_engine_monitor.py), so counting those calls on the CPU counts what the GPU would wait on.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
import torch

from helpers import compose_cfg
from esam.train import CONFIG_DIR
from esam.engine import NonFiniteLossError, Trainer
from esam.optim import METHODS
from esam.runtime import load_checkpoint

TINY = ["dataset=digits", "dataset.batch_size=32", "trainer.limit_train_batches=6", "trainer.limit_test_batches=1",
        "trainer.precision=fp32", "trainer.device=cpu", "trainer.num_threads=1", "trainer.progress=false",
        "trainer.timing_warmup_steps=1", "logger=none"]
HOST_READS = ("item", "__bool__", "tolist", "__float__", "__int__", "numpy", "cpu")


@pytest.fixture(autouse=True)
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def quiet_fit(trainer: Trainer):
    with contextlib.redirect_stdout(io.StringIO()):
        return trainer.fit()


@pytest.mark.parametrize("method", ["sgd", "sam"])
def test_no_host_read_between_steps(tmp_path, monkeypatch, method):
    """From the end of step 1 to the end of step 6 (five whole iterations of the loop: bookkeeping,
    the next batch, the closure, the method's step), nothing reads the device."""
    trainer = Trainer(compose_cfg([*TINY, f"optimizer={method}", "trainer.epochs=1", "trainer.check_every=1000"]),
                      tmp_path)
    reads: list[str] = []

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            reads.append(name)
            return fn(*args, **kwargs)
        return wrapper

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch.cuda, "synchronize", counted("synchronize", torch.cuda.synchronize))
    after_step: list[int] = []
    step = trainer.optimizer.step

    def marked(*args, **kwargs):
        out = step(*args, **kwargs)
        after_step.append(len(reads))
        return out

    trainer.optimizer.step = marked
    quiet_fit(trainer)
    assert len(after_step) == 6
    assert reads[after_step[0]:after_step[-1]] == []
    assert reads, "the epoch's end reads its sums (the counter works)"


@pytest.mark.parametrize("check_every,poison_at", [(3, 2), (3, 3), (4, 5)])
def test_a_non_finite_loss_stops_within_check_every_steps(tmp_path, check_every, poison_at):
    """Weights turned NaN before step ``poison_at`` of a 2-epoch run (6 steps each): the run stops
    at the first check point at or after it, names that step, and keeps epoch 0's checkpoint."""
    trainer = Trainer(compose_cfg([*TINY, "trainer.epochs=2", f"trainer.check_every={check_every}"]), tmp_path)
    step, done = trainer.optimizer.step, []

    def poisoned(*args, **kwargs):
        if len(done) + 1 == poison_at:
            with torch.no_grad():
                next(trainer.model.parameters()).fill_(float("nan"))
        out = step(*args, **kwargs)
        done.append(1)
        return out

    trainer.optimizer.step = poisoned
    with pytest.raises(NonFiniteLossError, match=f"at epoch 1 step {poison_at};"):
        quiet_fit(trainer)
    assert poison_at <= len(done) < poison_at + check_every
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert ckpt["global_step"] == 0 and all(torch.isfinite(v).all() for v in ckpt["model"].values()
                                            if v.is_floating_point())
    assert not (tmp_path / "summary.json").exists()


def test_the_trainer_logs_whatever_stats_the_method_reports(tmp_path):
    """No method names in the trainer: a statistic the optimizer reports appears as method_<key>."""
    trainer = Trainer(compose_cfg([*TINY, "trainer.epochs=1"]), tmp_path)
    step = trainer.optimizer.step

    def with_stats(*args, **kwargs):
        out = step(*args, **kwargs)
        trainer.optimizer.last_stats = {"made_up": torch.tensor(2.0), "host_value": 0.5}
        return out

    trainer.optimizer.step = with_stats
    quiet_fit(trainer)
    record = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert record["method_made_up"] == 2.0 and record["method_host_value"] == 0.5
    assert not any(k.startswith("sam_") for k in record)


def _method_options() -> list[str]:
    return sorted(p.stem for p in (Path(CONFIG_DIR) / "optimizer").glob("*.yaml") if p.stem in METHODS)


@pytest.mark.parametrize("method", _method_options())
def test_every_registered_method_trains_and_reports_its_cost(tmp_path, method):
    """The same loop drives every method in the registry (SAF gets its batches' dataset indices)."""
    summary = quiet_fit(Trainer(compose_cfg([*TINY, f"optimizer={method}", "trainer.epochs=1",
                                             "trainer.limit_train_batches=2"]), tmp_path))
    assert summary["train_steps"] == 2 and summary["compute_used"] > 0
    assert math.isfinite(summary["train_loss_final"])
