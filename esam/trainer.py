"""The one training loop every method shares.

It drives any optimizer through ``optimizer.step(closure)`` and never asks which
method it is. Per epoch it appends one line to ``metrics.jsonl``; at the end it
writes ``summary.json``; every ``checkpoint_every`` epochs and on SIGTERM/SIGUSR1
it writes ``checkpoints/last.pt`` (atomically), from which ``trainer.resume=auto``
continues with the same numbers it would have produced without the stop.

Timing: only ``optimizer.step`` is inside the step timer (device-synced on CUDA,
the first ``timing_warmup_steps`` steps of the run excluded), so images/s
compares methods, not data pipelines; epoch wall time is logged beside it.
"""
from __future__ import annotations

import contextlib
import json
import math
import platform
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from esam.data import DataBundle, build_data
from esam.errors import UserError
from esam.loggers import build_logger
from esam.models import build_model, count_parameters
from esam.runtime import (CHECKPOINT_FORMAT, atomic_torch_save, atomic_write_json,
                          atomic_write_text, device_name, git_commit, init_distributed,
                          load_checkpoint, resolve_device, resolve_precision, rng_states,
                          seed_everything, set_rng_states, sync)

STOP_SIGNALS = ("SIGTERM", "SIGUSR1")
# What a checkpoint's run and the resuming run must share (epochs, device, logging may differ).
RESUME_MUST_MATCH = ("dataset.name", "model.name", "model.args", "optimizer.name")


class NonFiniteLossError(UserError):
    pass


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


def _value(option: Any) -> str:
    """The string of a structured-config Enum option (or of a plain string)."""
    return str(getattr(option, "value", option))


def cosine_factor(progress: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


class Trainer:
    """Builds data, model and optimizer from a resolved config and trains in ``run_dir``."""

    def __init__(self, cfg: DictConfig, run_dir: str | Path) -> None:
        self.cfg = cfg
        tc = cfg.trainer
        if tc.epochs < 1:
            raise UserError(f"trainer.epochs must be >= 1, got {tc.epochs}")
        if tc.num_threads > 0:
            torch.set_num_threads(tc.num_threads)
        self.dist = init_distributed("cuda" if tc.device.startswith("cuda") or
                                     (tc.device == "auto" and torch.cuda.is_available()) else "cpu")
        self.device = resolve_device(tc.device, self.dist.local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.precision = resolve_precision(_value(tc.precision), self.device)
        self.run_dir = self._agree_on_run_dir(Path(run_dir))
        self._check_writable()
        seed_everything(cfg.seed)

        ds = OmegaConf.to_container(cfg.dataset, resolve=True)
        name = ds.pop("name")
        self.data: DataBundle = build_data(
            name, **ds, seed=cfg.seed, device=self.device,
            channels_last=cfg.model.channels_last, rank=self.dist.rank, world_size=self.dist.world_size,
        )
        torch.manual_seed(cfg.seed)  # same initial weights whatever the data builder drew
        model = build_model(cfg.model.name, num_classes=self.data.num_classes,
                            in_channels=self.data.in_channels,
                            **OmegaConf.to_container(cfg.model.args, resolve=True))
        self.num_params = count_parameters(model)
        model = model.to(self.device)
        if cfg.model.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.ddp_model: nn.Module = model
        if self.dist.world_size > 1:
            self.ddp_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.optimizer = self._build_optimizer()
        self.steps_per_epoch = self._steps_per_epoch()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer.base_optimizer, self._lr_factor)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

        # Progress, restored from a checkpoint when resuming.
        self.epoch = 0           # epochs completed
        self.step_in_epoch = 0   # steps completed in the current epoch (mid-epoch checkpoints)
        self.global_step = 0
        self.history: list[dict[str, Any]] = []
        self.best_acc = -1.0
        self.train_time_before = 0.0  # wall time of earlier pieces of a resumed run
        self.pieces = 1
        self.wandb_id: str | None = None
        self.acc: EpochAccumulator | None = None
        self._stop_signal: str | None = None

    # -- construction helpers ----------------------------------------------------------
    def _build_optimizer(self):
        from esam.optim import build_from_spec

        # SWP draws differ per rank (as in the authors' code) but are fixed by the run's seed.
        # Ints only: hash() of a str is salted per process (PYTHONHASHSEED), which made ESAM
        # runs with the same seed differ from one process to the next.
        swp_seed = hash((int(self.cfg.seed), self.dist.rank, 0x5E5)) & 0x7FFF_FFFF
        return build_from_spec(OmegaConf.to_container(self.cfg.optimizer, resolve=True),
                               self.model.parameters(), model=self.ddp_model, seed=swp_seed)

    def _steps_per_epoch(self) -> int:
        n = len(self.data.train)
        limit = self.cfg.trainer.limit_train_batches
        return min(n, limit) if limit > 0 else n

    def _lr_factor(self, step: int) -> float:
        """Multiplier of the base lr after ``step`` optimizer steps: linear warm-up over
        ``warmup_epochs``, then cosine to 0 at the last epoch. With ``schedule_per=epoch``
        (the authors' recipe) it is constant within an epoch."""
        tc = self.cfg.trainer
        t = step / self.steps_per_epoch  # epochs done, fractional
        if _value(tc.schedule_per) == "epoch":
            t = math.floor(t)
        if t < tc.warmup_epochs:
            return (t + 1.0 / (self.steps_per_epoch if _value(tc.schedule_per) == "step" else 1)) / tc.warmup_epochs
        if _value(tc.scheduler) == "constant":
            return 1.0
        return cosine_factor((t - tc.warmup_epochs) / max(1, tc.epochs - tc.warmup_epochs))

    def _agree_on_run_dir(self, run_dir: Path) -> Path:
        """Under torchrun every rank composes its own Hydra folder; rank 0's is the run's."""
        if self.dist.world_size > 1:
            box = [str(run_dir)]
            dist.broadcast_object_list(box, src=0)
            run_dir = Path(box[0])
        return run_dir

    def _check_writable(self) -> None:
        if not self.dist.is_main:
            return
        try:
            (self.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            probe = self.run_dir / ".write_test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise UserError(f"output folder {self.run_dir} is not writable ({e.strerror})") from None

    # -- checkpoints -----------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def state_dict(self) -> dict[str, Any]:
        acc = None
        if self.acc is not None and self.step_in_epoch > 0:
            acc = {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in vars(self.acc).items() if k != "stats"}
            acc["stats"] = {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in self.acc.stats.items()}
        return {
            "format": CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "rng": rng_states(),
            "history": self.history,
            "best_acc": self.best_acc,
            "train_time_s": self.train_time_before + self._elapsed(),
            "pieces": self.pieces,
            "epoch_accumulator": acc,
            "wandb_id": self.wandb_id,
            "config": OmegaConf.to_container(self.cfg, resolve=True),
        }

    def save_checkpoint(self, name: str = "last.pt") -> Path | None:
        # Never overwrite the last good state with diverged weights (a finite loss can precede them).
        if not bool(torch.stack([p.isfinite().all() for p in self.model.parameters()]).all()):
            self._non_finite(f"weights after step {self.global_step}")
        if not self.dist.is_main:
            return None
        path = self.checkpoint_dir / name
        with self.optimizer.evaluation_weights():
            atomic_torch_save(self.state_dict(), path)
        return path

    def _check_same_run(self, ckpt: dict[str, Any]) -> None:
        """Refuse to continue a checkpoint of another dataset, model or method: some would load
        without an error (e.g. SGD's state into SAM) and silently train something else."""
        def dig(d: Any, key: str) -> Any:
            for k in key.split("."):
                d = d.get(k) if isinstance(d, dict) else None
            return d

        saved, now = ckpt.get("config"), OmegaConf.to_container(self.cfg, resolve=True)
        for key in RESUME_MUST_MATCH if saved else ():
            if dig(saved, key) != dig(now, key):
                raise UserError(f"the checkpoint was trained with {key}={dig(saved, key)!r} but this run has "
                                f"{key}={dig(now, key)!r}; resume with the same {key.split('.')[0]} "
                                "or start a new run folder")

    def load_state(self, ckpt: dict[str, Any]) -> None:
        self._check_same_run(ckpt)
        try:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, KeyError, ValueError) as e:
            raise UserError(f"checkpoint does not match this model/optimizer config ({str(e).splitlines()[0]})") from None
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.step_in_epoch = ckpt["epoch"], ckpt["step_in_epoch"]
        self.global_step = ckpt["global_step"]
        self.history, self.best_acc = ckpt["history"], ckpt["best_acc"]
        self.train_time_before = ckpt["train_time_s"]
        self.pieces = ckpt["pieces"] + 1
        self.wandb_id = ckpt.get("wandb_id")
        set_rng_states(ckpt["rng"])
        acc = ckpt.get("epoch_accumulator")
        if acc is not None and self.step_in_epoch > 0:
            self.acc = EpochAccumulator(**{k: (v.to(self.device) if torch.is_tensor(v) else v)
                                           for k, v in acc.items() if k != "stats"})
            self.acc.stats = {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in acc["stats"].items()}

    def resolve_resume(self) -> Path | None:
        resume = self.cfg.trainer.resume
        if resume in (None, "", "none"):
            return None
        if resume == "auto":
            path = self.checkpoint_dir / "last.pt"
            return path if path.is_file() else None
        return Path(resume)

    # -- signals ---------------------------------------------------------------------------
    def _install_signal_handlers(self) -> dict:
        previous = {}

        def request_stop(signum, frame):
            # Keep the first: under Slurm pre-emption USR1 (requeue) may be followed by SIGTERM,
            # and it is USR1's handler (submitit's requeue) that must be chained after saving.
            if self._stop_signal is None:
                self._stop_signal = signal.Signals(signum).name

        for name in STOP_SIGNALS:
            if hasattr(signal, name):
                sig = getattr(signal, name)
                previous[sig] = signal.signal(sig, request_stop)
        return previous

    def _should_stop(self, non_finite: bool = False) -> bool:
        """True if a stop signal arrived; under DDP every rank asks every step (one all-reduce,
        which also carries a non-finite loss flag) so that all stop at the same step."""
        flag = self._stop_signal is not None
        self._non_finite_anywhere = non_finite
        if self.dist.world_size > 1:
            t = torch.tensor([int(flag), int(non_finite)],
                             device=self.device if self.device.type == "cuda" else "cpu")
            dist.all_reduce(t)
            flag, self._non_finite_anywhere = bool(t[0].item()), bool(t[1].item())
            if flag and self._stop_signal is None:
                self._stop_signal = "SIGTERM"  # another rank got it
        return flag

    # -- the loop --------------------------------------------------------------------------
    def _elapsed(self) -> float:
        return time.perf_counter() - self._t_start if hasattr(self, "_t_start") else 0.0

    def fit(self) -> dict[str, Any]:
        resume_path = self.resolve_resume()
        if resume_path is not None:
            self.load_state(load_checkpoint(resume_path))
            self._print(f"resumed from {resume_path} at epoch {self.epoch} step {self.step_in_epoch}")
        if self.dist.is_main:
            self._rewrite_metrics_file()
            # summary.json marks a finished run; one left from an earlier run of this folder goes.
            (self.run_dir / "summary.json").unlink(missing_ok=True)
        cfg_dict = OmegaConf.to_container(self.cfg, resolve=True)
        logger = build_logger(
            self.cfg.logger, name=self.cfg.name, group=self.cfg.experiment_name,
            tags=[self.cfg.dataset.name, self.cfg.model.label, self.cfg.optimizer.label], config=cfg_dict,
            run_dir=str(self.run_dir), run_id=self.wandb_id,
        ) if self.dist.is_main else build_logger(OmegaConf.create({"name": "none"}), name="", group="",
                                                  tags=[], config={}, run_dir="")
        self.wandb_id = logger.run_id
        previous = self._install_signal_handlers()
        self._t_start = time.perf_counter()
        exit_code = 1
        try:
            if self.epoch == 0 and self.step_in_epoch == 0 and self.cfg.trainer.checkpoint_every > 0:
                self.save_checkpoint()  # a last good state exists even if epoch 1 diverges
            while self.epoch < self.cfg.trainer.epochs:
                record = self._train_epoch()
                if record is None:  # stopped by a signal mid-epoch
                    path = self.save_checkpoint()
                    self._print(f"received {self._stop_signal}: checkpoint saved to {path}; "
                                "rerun with trainer.resume=auto to continue")
                    exit_code = 0
                    self._chain_signal(previous)
                    sys.exit(128 + getattr(signal, self._stop_signal))
                record.update(self.evaluate())
                if not all(math.isfinite(record[k]) for k in ("train_loss", "test_loss")):
                    self._non_finite(f"test loss after epoch {self.epoch + 1} (step {self.step_in_epoch})")
                self.epoch += 1
                self.step_in_epoch = 0
                self.acc = None
                record["epoch"] = self.epoch
                self.history.append(record)
                is_best = record["test_acc"] > self.best_acc
                self.best_acc = max(self.best_acc, record["test_acc"])
                if self.dist.is_main:
                    self._append_metrics(record)
                    logger.log_epoch(record)
                    self._print(self._epoch_line(record))
                every = self.cfg.trainer.checkpoint_every
                if (every > 0 and self.epoch % every == 0) or self.epoch == self.cfg.trainer.epochs:
                    self.save_checkpoint()
                if is_best and self.cfg.trainer.keep_best and self.dist.is_main:
                    atomic_torch_save({"format": CHECKPOINT_FORMAT, "model": self.model.state_dict(),
                                       "epoch": self.epoch, "test_acc": record["test_acc"]},
                                      self.checkpoint_dir / "best.pt")
                if self._should_stop():
                    self._print(f"received {self._stop_signal}: checkpoint saved after epoch {self.epoch}")
                    self.save_checkpoint()
                    self._chain_signal(previous)
                    sys.exit(128 + getattr(signal, self._stop_signal))
            summary = self.summary()
            if self.dist.is_main:
                atomic_write_json(self.run_dir / "summary.json", summary)
                logger.log_summary(summary)
            exit_code = 0
            return summary
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            logger.finish(exit_code=exit_code)

    def _chain_signal(self, previous: dict) -> None:
        """Hand the signal we stopped on (only that one) to the handler it had before ours,
        after our checkpoint: submitit's requeues the Slurm job."""
        sig = getattr(signal, self._stop_signal)
        handler = previous.get(sig)
        if callable(handler) and handler is not signal.default_int_handler:
            try:
                handler(sig, None)
            except SystemExit:
                raise
            except Exception:
                pass

    def _closure_factory(self, x: torch.Tensor, y: torch.Tensor, keep: dict) -> Callable:
        model, dtype = self.ddp_model, self.autocast_dtype
        smoothing = self.cfg.trainer.label_smoothing
        autocast = (lambda: torch.autocast(self.device.type, dtype=dtype)) if dtype else contextlib.nullcontext

        def closure(indices: torch.Tensor | None = None) -> torch.Tensor:
            xb, yb = (x, y) if indices is None else (x[indices], y[indices])
            with autocast():
                logits = model(xb)
            if "logits" not in keep:  # the first pass, at w: what train accuracy is measured on
                keep["logits"] = logits.detach()
            return F.cross_entropy(logits.float(), yb, reduction="none", label_smoothing=smoothing)

        return closure

    def _train_epoch(self) -> dict[str, Any] | None:
        self.ddp_model.train()
        tc = self.cfg.trainer
        if self.acc is None:
            self.acc = EpochAccumulator.zeros(self.device)
            self.acc.lr = self.optimizer.param_groups[0]["lr"]
        acc = self.acc
        lr = acc.lr if acc.lr is not None else self.optimizer.param_groups[0]["lr"]
        t_epoch = time.perf_counter()
        start = self.step_in_epoch
        batches = self.data.train.batches(self.epoch, start)
        show = tc.progress and self.dist.is_main
        bar = None
        if show:
            from tqdm import tqdm

            bar = tqdm(total=self.steps_per_epoch, initial=start, desc=f"epoch {self.epoch + 1}/{tc.epochs}",
                       leave=False, mininterval=1.0, file=sys.stderr)
        for i in range(start, self.steps_per_epoch):
            x, y = next(batches)
            keep: dict[str, torch.Tensor] = {}
            closure = self._closure_factory(x, y, keep)
            self.optimizer.set_progress(self.epoch + i / self.steps_per_epoch, tc.epochs)
            sync(self.device)
            t0 = time.perf_counter()
            losses = self.optimizer.step(closure, grad_scaler=self.scaler)
            sync(self.device)
            dt = time.perf_counter() - t0
            self.scheduler.step()
            self.global_step += 1
            self.step_in_epoch = i + 1
            n = y.shape[0]
            if self.global_step > tc.timing_warmup_steps:
                acc.timed_steps += 1
                acc.timed_samples += n
                acc.timed_seconds += dt
            loss_sum = losses.double().sum()
            bad = self.scaler is None and not bool(torch.isfinite(loss_sum))
            stop = self._should_stop(non_finite=bad)
            if self._non_finite_anywhere:  # every rank raises at the same step: no rank hangs
                self._non_finite(f"training loss at epoch {self.epoch + 1} step {i + 1}")
            acc.loss_sum += loss_sum
            acc.correct += (keep["logits"].argmax(1) == y).sum()
            acc.samples += n
            acc.steps += 1
            for k, v in self.optimizer.last_stats.items():
                acc.stats[k] = acc.stats.get(k, 0.0) + (v.detach().double() if torch.is_tensor(v) else v)
            if bar is not None:
                bar.update(1)
            if stop:
                acc.elapsed_before += time.perf_counter() - t_epoch
                if bar is not None:
                    bar.close()
                return None
        if bar is not None:
            bar.close()
        return self._epoch_record(acc, lr, acc.elapsed_before + time.perf_counter() - t_epoch)

    def _non_finite(self, where: str) -> None:
        last = self.checkpoint_dir / "last.pt"
        kept = (f"the last good state is in {last}" if last.is_file()
                else "no checkpoint was saved (trainer.checkpoint_every=0)")
        hint = "lower the lr or rho" + (", or use fp32" if self.precision != "fp32" else "")
        raise NonFiniteLossError(f"non-finite {where}; the run stops here and {kept} ({hint})")

    def _epoch_record(self, acc: EpochAccumulator, lr: float, epoch_time: float) -> dict[str, Any]:
        sums = torch.stack([acc.loss_sum, acc.correct.double(), torch.tensor(float(acc.samples), device=self.device, dtype=torch.float64)])
        if self.dist.world_size > 1:
            dist.all_reduce(sums)
        loss_sum, correct, samples = sums.tolist()
        images = samples  # all ranks
        record: dict[str, Any] = {
            "epoch": self.epoch + 1,
            "lr": lr,
            "train_loss": loss_sum / samples,
            "train_acc": 100.0 * correct / samples,
            "epoch_time_s": epoch_time,
            "train_steps": acc.steps,
            "train_img_per_s": (acc.timed_samples * self.dist.world_size / acc.timed_seconds
                                if acc.timed_seconds > 0 else None),
            "epoch_img_per_s": images / epoch_time if epoch_time > 0 else None,
            "step_ms": 1000.0 * acc.timed_seconds / acc.timed_steps if acc.timed_steps else None,
            "timed_steps": acc.timed_steps,
            "timed_seconds": acc.timed_seconds,
        }
        names = {"sharpness": "sam_sharpness", "sample_frac": "sam_sample_frac", "param_frac": "sam_param_frac"}
        for k, v in acc.stats.items():
            record[names.get(k, f"sam_{k}")] = float(v) / max(1, acc.steps)
        return record

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        with self.optimizer.evaluation_weights():
            return self._evaluate()

    def _evaluate(self) -> dict[str, float]:
        self.ddp_model.eval()
        model = self.model  # no DDP forward in eval: nothing to synchronise
        dtype = self.autocast_dtype
        sums = torch.zeros(4, device=self.device, dtype=torch.float64)  # loss, top1, top5, n
        limit = self.cfg.trainer.limit_test_batches
        for b, (x, y) in enumerate(self.data.test.batches(0)):
            if limit and b >= limit:
                break
            with torch.autocast(self.device.type, dtype=dtype) if dtype else contextlib.nullcontext():
                logits = model(x)
            logits = logits.float()
            top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
            sums[0] += F.cross_entropy(logits, y, reduction="sum").double()
            sums[1] += (top5[:, 0] == y).sum()
            sums[2] += (top5 == y[:, None]).any(1).sum()
            sums[3] += y.shape[0]
        if self.dist.world_size > 1:
            dist.all_reduce(sums)
        loss, top1, top5, n = sums.tolist()
        return {"test_loss": loss / n, "test_acc": 100.0 * top1 / n, "test_acc5": 100.0 * top5 / n}

    # -- files -----------------------------------------------------------------------------
    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    def _rewrite_metrics_file(self) -> None:
        """On (re)start the file holds exactly the epochs the checkpoint has: none lost, none twice."""
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in self.history))

    def _append_metrics(self, record: dict[str, Any]) -> None:
        import os

        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def summary(self) -> dict[str, Any]:
        h = self.history
        timed_s = sum(r["timed_seconds"] for r in h)
        timed_steps = sum(r["timed_steps"] for r in h)
        imgs = [r["train_img_per_s"] for r in h if r["timed_steps"] > 0]
        best = max(h, key=lambda r: r["test_acc"])
        opt_cfg = self.cfg.optimizer
        return {
            "status": "completed",
            "name": self.cfg.name,
            "experiment": self.cfg.experiment_name,
            "dataset": self.cfg.dataset.name,
            "model": self.cfg.model.label,
            "optimizer": self.cfg.optimizer.label,
            "method": self.cfg.optimizer.name,
            "seed": self.cfg.seed,
            "epochs": len(h),
            "test_acc_final": h[-1]["test_acc"],
            "test_acc5_final": h[-1]["test_acc5"],
            "test_acc_best": best["test_acc"],
            "best_epoch": best["epoch"],
            "train_loss_final": h[-1]["train_loss"],
            "train_time_s": self.train_time_before + self._elapsed(),
            "train_step_time_s": timed_s,
            "img_per_s": sum(imgs) / len(imgs) if imgs else None,  # JSON null, not NaN
            "step_ms": 1000.0 * timed_s / timed_steps if timed_steps else None,
            "batch_size": self.cfg.dataset.batch_size,
            "rho": opt_cfg.get("rho"), "beta": opt_cfg.get("beta"), "gamma": opt_cfg.get("gamma"),
            "num_params": self.num_params,
            "device": str(self.device.type),
            "device_name": device_name(self.device),
            "precision": self.precision,
            "channels_last": bool(self.cfg.model.channels_last),
            "world_size": self.dist.world_size,
            "num_threads": torch.get_num_threads(),
            "torch_version": torch.__version__,
            "python_version": platform.python_version(),
            "hostname": platform.node(),
            "git_commit": git_commit(),
            "pieces": self.pieces,
            "run_dir": str(self.run_dir),
            "config": OmegaConf.to_container(self.cfg, resolve=True),
        }

    def _print(self, msg: str) -> None:
        if self.dist.is_main:
            print(msg, flush=True)

    def _epoch_line(self, r: dict[str, Any]) -> str:
        extra = f" sharpness {r['sam_sharpness']:.4f}" if "sam_sharpness" in r else ""
        return (f"epoch {r['epoch']:>3}/{self.cfg.trainer.epochs}  lr {r['lr']:.4f}  "
                f"train loss {r['train_loss']:.4f} acc {r['train_acc']:.2f}  "
                f"test loss {r['test_loss']:.4f} acc {r['test_acc']:.2f} top5 {r['test_acc5']:.2f}  "
                f"{r['train_img_per_s'] or float('nan'):.0f} img/s  {r['epoch_time_s']:.1f}s{extra}")
