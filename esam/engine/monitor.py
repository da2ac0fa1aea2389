"""What the loop measures during an epoch without making any step wait for the host.

On CUDA a host read of a device value (``.item()``, ``bool(t)``, ``torch.cuda.synchronize``)
stalls the queue: the next batch's augmentation and the logging can no longer overlap the
step. So sums stay on the device (:class:`EpochAccumulator`), the step timer records CUDA
events and reads them at :meth:`StepTimer.flush` (epoch end), and the non-finite-loss check
keeps the first bad step on the device (:class:`NonFiniteWatch`), read every
``trainer.check_every`` steps and at the epoch's end.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from esam.loggers import stat_key


@dataclass
class EpochAccumulator:
    """Sums kept on the device during an epoch so that no step waits on the host."""

    loss_sum: torch.Tensor
    correct: torch.Tensor
    stats: dict[str, Any] = field(default_factory=dict)
    samples: int = 0
    steps: int = 0
    timed_steps: int = 0
    timed_samples: int = 0
    timed_seconds: float = 0.0
    elapsed_before: float = 0.0  # epoch wall time spent before a mid-epoch resume
    lr: float | None = None      # the epoch's lr as logged (the scheduler moves on within/after it)

    @classmethod
    def zeros(cls, device: torch.device) -> "EpochAccumulator":
        return cls(torch.zeros((), device=device, dtype=torch.float64),
                   torch.zeros((), device=device, dtype=torch.int64))

    def add_step(self, losses: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
                 stats: dict[str, Any]) -> torch.Tensor:
        """Add one step's per-sample losses, accuracy and method statistics; returns the loss sum."""
        loss_sum = losses.double().sum()
        self.loss_sum += loss_sum
        self.correct += (logits.argmax(1) == labels).sum()
        self.samples += labels.shape[0]
        self.steps += 1
        for k, v in stats.items():
            self.stats[k] = self.stats.get(k, 0.0) + (v.detach().double() if torch.is_tensor(v) else v)
        return loss_sum

    def to_state(self) -> dict[str, Any]:
        """CPU copy for a checkpoint."""
        cpu = lambda v: v.cpu() if torch.is_tensor(v) else v  # noqa: E731
        state = {k: cpu(v) for k, v in vars(self).items() if k != "stats"}
        state["stats"] = {k: cpu(v) for k, v in self.stats.items()}
        return state

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device) -> "EpochAccumulator":
        move = lambda v: v.to(device) if torch.is_tensor(v) else v  # noqa: E731
        acc = cls(**{k: move(v) for k, v in state.items() if k != "stats"})
        acc.stats = {k: move(v) for k, v in state.get("stats", {}).items()}
        return acc


class StepTimer:
    """Time spent inside ``optimizer.step``: CPU wall clock around it (a CPU step is synchronous),
    CUDA events on the GPU, read at :meth:`flush` so no step waits for the device."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._pending: list[tuple[Any, Any, int]] = []  # CUDA (start, end, samples)
        self._start: Any = None
        self._timed = False
        self.steps, self.samples, self.seconds = 0, 0, 0.0

    def start(self, timed: bool) -> None:
        """Before a step; ``timed=False`` for the warm-up steps the timer leaves out."""
        self._timed = timed
        if not timed:
            return
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = time.perf_counter()

    def stop(self, samples: int) -> None:
        if not self._timed:
            return
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._pending.append((self._start, end, samples))
        else:
            self.seconds += time.perf_counter() - self._start
            self.steps += 1
            self.samples += samples

    def flush(self) -> tuple[int, int, float]:
        """(steps, samples, seconds) timed since the last flush; on CUDA one wait for the last event."""
        if self._pending:
            self._pending[-1][1].synchronize()
            for start, end, n in self._pending:
                self.seconds += start.elapsed_time(end) / 1000.0
                self.steps += 1
                self.samples += n
            self._pending = []
        out = (self.steps, self.samples, self.seconds)
        self.steps, self.samples, self.seconds = 0, 0, 0.0
        return out


class NonFiniteWatch:
    """The first global step whose training loss was not finite, kept on the device (-1: none)."""

    def __init__(self, device: torch.device) -> None:
        self.first = torch.full((), -1, dtype=torch.int64, device=device)

    def observe(self, loss_sum: torch.Tensor, global_step: int) -> None:
        """No host read: a device-side select (the Python int is a kernel argument, not a copy)."""
        new = ~torch.isfinite(loss_sum) & (self.first < 0)
        self.first = torch.where(new, global_step, self.first)

    def first_bad_step(self) -> int | None:
        """Host read (a device sync on CUDA): call it only at check points."""
        step = int(self.first)
        return step if step >= 0 else None


def epoch_record(acc: EpochAccumulator, epoch_time: float, run: Any, *, epoch: int, compute_used: float,
                 wall_time_before: float) -> dict[str, Any]:
    """The epoch's metrics.jsonl line from its device sums (all-reduced over DDP ranks: one read)."""
    sums = torch.stack([acc.loss_sum, acc.correct.double(),
                        torch.tensor(float(acc.samples), device=run.device, dtype=torch.float64)])
    if run.dist.world_size > 1:
        dist.all_reduce(sums)
    loss_sum, correct, samples = sums.tolist()  # all ranks
    record: dict[str, Any] = {
        "epoch": epoch,
        "lr": acc.lr,
        "train_loss": loss_sum / samples,
        "train_acc": 100.0 * correct / samples,
        "epoch_time_s": epoch_time,
        "train_steps": acc.steps,
        "train_img_per_s": (acc.timed_samples * run.dist.world_size / acc.timed_seconds
                            if acc.timed_seconds > 0 else None),
        "epoch_img_per_s": samples / epoch_time if epoch_time > 0 else None,
        "step_ms": 1000.0 * acc.timed_seconds / acc.timed_steps if acc.timed_steps else None,
        "timed_steps": acc.timed_steps,
        "timed_seconds": acc.timed_seconds,
        # Cumulative: SGD-epoch equivalents spent, and training wall time (evaluation excluded).
        "compute_used": compute_used,
        "wall_time_s": wall_time_before + epoch_time,
    }
    for k, v in acc.stats.items():  # whatever the method reports, averaged over the epoch's steps
        record[stat_key(k)] = float(v) / max(1, acc.steps)
    return record


def score_loader(run: Any, loader: Any, prefix: str, limit: int = 0) -> dict[str, float]:
    """``<prefix>_loss``, ``_acc`` and ``_acc5`` of ``run.model`` in eval mode over ``loader`` (its
    first ``limit`` batches if > 0); the sums stay on the device, one all-reduce under DDP."""
    run.ddp_model.eval()
    sums = torch.zeros(4, device=run.device, dtype=torch.float64)  # loss, top1, top5, n
    for b, (x, y) in enumerate(loader.batches(0)):
        if limit and b >= limit:
            break
        with run.autocast():
            logits = run.model(x)  # no DDP forward in eval: nothing to synchronise
        logits = logits.float()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        sums[0] += F.cross_entropy(logits, y, reduction="sum").double()
        sums[1] += (top5[:, 0] == y).sum()
        sums[2] += (top5 == y[:, None]).any(1).sum()
        sums[3] += y.shape[0]
    if run.dist.world_size > 1:
        dist.all_reduce(sums)
    loss, top1, top5, n = sums.tolist()
    return {f"{prefix}_loss": loss / n, f"{prefix}_acc": 100.0 * top1 / n, f"{prefix}_acc5": 100.0 * top5 / n}
