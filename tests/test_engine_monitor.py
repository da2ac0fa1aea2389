"""Device-side epoch sums, the step timer and the non-finite watch, without a training run."""
from __future__ import annotations

import pytest
import torch

from esam.engine import monitor
from esam.engine.monitor import EpochAccumulator, NonFiniteWatch, StepTimer

CPU = torch.device("cpu")


def test_accumulator_sums_losses_accuracy_and_method_stats():
    acc = EpochAccumulator.zeros(CPU)
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, 0.0]])
    labels = torch.tensor([0, 0, 0])
    s = acc.add_step(torch.tensor([0.5, 1.0, 0.25]), logits, labels, {"sharpness": torch.tensor(0.2), "frac": 0.5})
    acc.add_step(torch.tensor([1.0]), logits[:1], labels[:1], {"sharpness": torch.tensor(0.4), "frac": 0.5})
    assert s.dtype == torch.float64 and float(s) == 1.75
    assert float(acc.loss_sum) == 2.75 and int(acc.correct) == 3  # rows 0, 2, then row 0 again
    assert (acc.samples, acc.steps) == (4, 2)
    assert float(acc.stats["sharpness"]) == pytest.approx(0.6) and acc.stats["frac"] == 1.0


def test_accumulator_round_trips_through_a_checkpoint_state():
    acc = EpochAccumulator.zeros(CPU)
    acc.add_step(torch.tensor([0.5]), torch.tensor([[1.0, 0.0]]), torch.tensor([0]), {"k": torch.tensor(3.0)})
    acc.timed_seconds, acc.lr = 1.5, 0.1
    back = EpochAccumulator.from_state(acc.to_state(), CPU)
    assert float(back.loss_sum) == 0.5 and int(back.correct) == 1 and float(back.stats["k"]) == 3.0
    assert (back.samples, back.steps, back.timed_seconds, back.lr) == (1, 1, 1.5, 0.1)


def test_cpu_step_timer_leaves_out_warmup_steps_and_resets_on_flush():
    t = StepTimer(CPU)
    t.start(timed=False)
    t.stop(32)
    for _ in range(3):
        t.start(timed=True)
        t.stop(32)
    steps, samples, seconds = t.flush()
    assert (steps, samples) == (3, 96) and seconds >= 0
    assert t.flush() == (0, 0, 0.0)


class FakeEvent:
    """Stands in for torch.cuda.Event: records are free, only synchronize() waits."""
    syncs = 0
    clock = 0.0

    def __init__(self, enable_timing: bool = False) -> None:
        self.t = None

    def record(self) -> None:
        FakeEvent.clock += 0.010
        self.t = FakeEvent.clock

    def synchronize(self) -> None:
        FakeEvent.syncs += 1

    def elapsed_time(self, end: "FakeEvent") -> float:
        return 1000.0 * (end.t - self.t)  # milliseconds, as CUDA reports


def test_cuda_step_timer_waits_once_per_flush_not_per_step(monkeypatch):
    monkeypatch.setattr(monitor.torch.cuda, "Event", FakeEvent)
    FakeEvent.syncs = 0
    t = StepTimer(torch.device("cuda"))
    for _ in range(5):
        t.start(timed=True)
        t.stop(64)
    assert FakeEvent.syncs == 0  # the steps never waited
    steps, samples, seconds = t.flush()
    assert FakeEvent.syncs == 1
    assert (steps, samples) == (5, 320) and seconds == pytest.approx(5 * 0.010)


def test_watch_keeps_the_first_non_finite_step():
    w = NonFiniteWatch(CPU)
    assert w.first_bad_step() is None
    w.observe(torch.tensor(1.0, dtype=torch.float64), 1)
    w.observe(torch.tensor(float("inf"), dtype=torch.float64), 3)
    w.observe(torch.tensor(float("nan"), dtype=torch.float64), 5)
    assert w.first_bad_step() == 3


class _Dist:
    world_size = 1


class _Run:
    device, dist = CPU, _Dist()


def test_epoch_record_puts_method_stats_in_the_method_namespace():
    """A method's statistics are method_<stat> whatever the method (LookSAM's sam_step is
    method_sam_step, not sam_sam_step), averaged over the epoch's steps."""
    acc = EpochAccumulator.zeros(CPU)
    for sharpness, sam_step in ((0.25, 1.0), (0.75, 0.0)):
        acc.add_step(torch.tensor([1.0, 3.0]), torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]),
                     {"sharpness": torch.tensor(sharpness), "sam_step": sam_step})
    record = monitor.epoch_record(acc, 2.0, _Run(), epoch=3, compute_used=1.5, wall_time_before=4.0)
    assert record["method_sharpness"] == 0.5 and record["method_sam_step"] == 0.5
    assert not [k for k in record if k.startswith("sam_")]
    assert (record["epoch"], record["train_loss"], record["train_acc"], record["wall_time_s"]) == (3, 2.0, 50.0, 6.0)
    assert record["train_img_per_s"] is None  # nothing timed
