"""The one training loop every method shares.

It drives any optimizer through ``optimizer.step(closure)`` and never asks which method it is:
the method's own statistics come from ``optimizer.last_stats`` (logged as ``method_<key>``, wandb ``method/<key>``) and
its cost from ``optimizer.last_cost``. Per epoch it appends one line to ``metrics.jsonl``; at
the end it writes ``summary.json``; every ``checkpoint_every`` epochs and on SIGTERM/SIGUSR1/Ctrl-C it
writes ``checkpoints/last.pt`` (atomically), from which a resumed run continues with the same
numbers it would have produced without the stop.

No step waits for the device: sums, the non-finite-loss flag and the step timer's CUDA events
stay on the device and are read every ``trainer.check_every`` steps and at each epoch's end.
Timing: only ``optimizer.step`` is inside the step timer (the first ``timing_warmup_steps``
steps of the run excluded), so images/s compares methods, not data pipelines; epoch wall time
is logged beside it. Under ``trainer.budget`` the run stops on the compute it has spent.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from esam.engine.build import Run, build_run
from esam.engine.hooks import FINAL_HOOKS, evaluation_variants, final_hooks
from esam.engine.checkpoint import (Progress, best_state, checkpoint_state, restore, resolve_resume,
                                    resume_command)
from esam.engine.monitor import EpochAccumulator, NonFiniteWatch, StepTimer, epoch_record, score_loader
from esam.engine.run_files import RunFiles, epoch_line, say, summarize
from esam.engine.signals import StopSignals
from esam.errors import UserError
from esam.loggers import build_logger
from esam.optim.closure import make_closure
from esam.runtime import atomic_torch_save, load_checkpoint


class NonFiniteLossError(UserError):
    pass


class Trainer:
    """Trains the run ``cfg`` describes in ``run_dir`` (built by :func:`build_run`)."""

    def __init__(self, cfg: DictConfig, run_dir: str | Path) -> None:
        self.cfg = cfg
        self.run: Run = build_run(cfg, run_dir)
        self.files = RunFiles(self.run.run_dir, self.run.dist.is_main)
        self.state = Progress()
        self.acc: EpochAccumulator | None = None   # the current epoch's sums
        self.signals = StopSignals(announce=self.run.dist.is_main)
        self.watch = NonFiniteWatch(self.run.device)
        self.timer = StepTimer(self.run.device)
        self._t_start: float | None = None
        # checked now (a misspelt hook fails before training, not after it)
        self.final_hooks = final_hooks(self.optimizer, cfg.trainer.get("before_final_eval"))

    # The parts callers (and tests) reach for.
    model = property(lambda self: self.run.model)
    optimizer = property(lambda self: self.run.optimizer)
    global_step = property(lambda self: self.state.global_step)

    # -- the run, in the order things happen ---------------------------------------------
    def fit(self) -> dict[str, Any]:
        self._resume()
        self.files.start(self.state.history)
        logger = self._open_logger()
        self._t_start = time.perf_counter()
        exit_code = 1
        with self.signals:
            try:
                if self.state.global_step == 0 and self.cfg.trainer.checkpoint_every > 0:
                    self.save_checkpoint()  # a last good state exists even if epoch 1 diverges
                while not self._finished():
                    record = self._train_epoch()
                    if record is None:  # a stop signal mid-epoch
                        exit_code = 0
                        self._save_and_exit(f"checkpoint saved to {self.run.checkpoint_dir / 'last.pt'}")
                    record.update(self.evaluate())
                    if not all(math.isfinite(record[k]) for k in ("train_loss", "test_loss")):
                        self._non_finite(f"test loss after epoch {self.state.epoch + 1} "
                                         f"(step {self.state.step_in_epoch})")
                    self._end_epoch(record, logger)
                    if self._check():  # a stop signal during the epoch's evaluation or saving
                        exit_code = 0
                        self._save_and_exit(f"checkpoint saved after epoch {self.state.epoch}")
                summary = summarize(self.run, self.state.history, train_time_s=self._train_time(),
                                    pieces=self.state.pieces, final=self._final_evaluation())
                self.files.write_summary(summary)
                if self.run.dist.is_main:
                    logger.log_summary(summary)
                exit_code = 0
                return summary
            finally:
                logger.finish(exit_code=exit_code)

    def _resume(self) -> None:
        path, note = resolve_resume(self.cfg.trainer.resume, self.run.run_dir)
        if note:
            self._say(note)
        if path is None:
            return
        self.state, self.acc = restore(self.run, load_checkpoint(path))
        self._say(f"resumed from {path}: {self._next_step_words()}")

    def _next_step_words(self) -> str:
        """What the resumed run does next, in the numbering its epoch lines will use."""
        s, spe, total = self.state, self.run.steps_per_epoch, self.run.epochs_label
        if self._finished():
            return f"all {s.epoch} epochs are done; writing its results again"
        if s.step_in_epoch == 0:
            return f"next is epoch {s.epoch + 1}/{total}"
        if s.step_in_epoch >= spe:
            return f"epoch {s.epoch + 1}/{total} has run all its steps; next is its evaluation"
        return f"next is epoch {s.epoch + 1}/{total} at step {s.step_in_epoch + 1}/{spe}"

    def _open_logger(self):
        if not self.run.dist.is_main:
            return build_logger(OmegaConf.create({"name": "none"}), name="", group="", tags=[], config={}, run_dir="")
        cfg = self.cfg
        logger = build_logger(cfg.logger, name=cfg.name, group=cfg.experiment_name,
                              tags=[cfg.dataset.name, cfg.model.label, cfg.optimizer.label],
                              config=OmegaConf.to_container(cfg, resolve=True), run_dir=str(self.run.run_dir),
                              run_id=self.state.wandb_id)
        self.state.wandb_id = logger.run_id
        return logger

    def _finished(self) -> bool:
        if self._max_steps_reached():
            return True
        if self.run.budget is None:
            return self.state.epoch >= self.cfg.trainer.epochs
        # Between epochs: would the next epoch's first (full) batch be past the budget? The same
        # question the loop asks before each step, so no epoch starts only to run no step.
        return self.state.step_in_epoch == 0 and self._budget_reached(self.cfg.dataset.batch_size)

    def _max_steps_reached(self) -> bool:
        """trainer.max_steps (trainer=debug): the first steps of the run as configured (its
        schedule, batch and method), then the evaluation and the run's files, whatever its epochs."""
        limit = self.cfg.trainer.get("max_steps", 0)
        return limit > 0 and self.state.global_step >= limit

    def _budget_reached(self, next_samples: int) -> bool:
        """Is the compute measured so far at the budget, rounded to the nearest step boundary?
        The next step (estimated at the method's declared cost, which is the same on every rank
        and after a resume) would overshoot it by more than stopping now undershoots it. So SGD
        at budget E runs exactly E epochs, and any method lands within half a step of E."""
        run = self.run
        half_step = 0.5 * run.step_units * next_samples
        return (self.state.compute_units + half_step) / run.epoch_units >= run.budget - 1e-9

    def _train_epoch(self) -> dict[str, Any] | None:
        """One epoch (or the rest of it after a resume); None if a stop signal came."""
        run, tc, s = self.run, self.cfg.trainer, self.state
        run.ddp_model.train()
        if self.acc is None:
            self.acc = EpochAccumulator.zeros(run.device)
            self.acc.lr = run.optimizer.param_groups[0]["lr"]
        acc, t_epoch, world = self.acc, time.perf_counter(), run.dist.world_size
        # Dataset indices ride along with every batch (free: the loader gathers by them) for
        # methods with per-sample memory (SAF); the trainer need not know which those are.
        batches = run.data.train.batches(s.epoch, s.step_in_epoch, with_indices=True)
        bar = self._progress_bar()
        # Under DDP the ranks' measured costs differ (ESAM's per-rank draws): the budget is
        # looked at only where _check has made every rank's count the same.
        agreed = True
        for i in range(s.step_in_epoch, run.steps_per_epoch):
            x, y, ids = next(batches)
            n_all = y.shape[0] * world
            if run.budget is not None and (world == 1 or agreed) and self._budget_reached(n_all):
                break
            if self._max_steps_reached():
                break
            closure = make_closure(run.ddp_model, x, y, autocast=run.autocast, label_smoothing=tc.label_smoothing,
                                   channels_last=self.cfg.model.channels_last, sample_ids=ids)
            run.optimizer.set_progress(s.epoch + i / run.steps_per_epoch, run.planned_epochs)
            self.timer.start(timed=s.global_step + 1 > tc.timing_warmup_steps)
            losses = run.optimizer.step(closure, grad_scaler=run.scaler)
            self.timer.stop(y.shape[0])
            run.scheduler.step()
            s.global_step += 1
            s.step_in_epoch = i + 1
            s.compute_units += run.optimizer.last_cost * n_all
            # Train accuracy from the first pass (at w), which every method runs: no extra forward.
            loss_sum = acc.add_step(losses, closure.first_logits, y, run.optimizer.last_stats)
            if run.scaler is None:  # fp16: the GradScaler skips non-finite steps itself
                self.watch.observe(loss_sum, s.global_step)
            if bar is not None:
                bar.update(1)
            # A signal is a host flag (free to look at); the device is read every check_every steps.
            stop = world == 1 and self.signals.received is not None
            agreed = stop or s.global_step % tc.check_every == 0
            if agreed and self._check():
                self._flush_timer()
                acc.elapsed_before += time.perf_counter() - t_epoch
                if bar is not None:
                    bar.close()
                return None
        if bar is not None:
            bar.close()
        self._check()  # the epoch's last look: its loss must be finite (a signal is handled after it)
        self._flush_timer()
        previous = self.state.history[-1] if self.state.history else {}
        return epoch_record(acc, acc.elapsed_before + time.perf_counter() - t_epoch, self.run,
                            epoch=self.state.epoch + 1, compute_used=self.state.compute_units / self.run.epoch_units,
                            wall_time_before=previous.get("wall_time_s", 0.0))

    def _check(self) -> bool:
        """Read what the device kept: raise on a non-finite training loss, and return whether
        to stop for a signal. Under DDP one all-reduce makes every rank see the same (and the
        same compute count), so all stop, or raise, at the same step."""
        run, s = self.run, self.state
        stop, bad = self.signals.received is not None, self.watch.first_bad_step()
        if run.dist.world_size > 1:
            t = torch.tensor([float(stop), float(bad is not None), s.compute_units],
                             dtype=torch.float64, device=run.device)
            dist.all_reduce(t)
            stop_any, bad_any, units = t.tolist()
            s.compute_units = units / run.dist.world_size
            if stop_any and self.signals.received is None:
                self.signals.received = "SIGTERM"  # another rank got it
            stop = bool(stop_any)
            if bad_any and bad is None:
                self._non_finite(f"training loss on another rank by step {s.global_step}")
        if bad is not None:
            epoch, step = divmod(bad - 1, run.steps_per_epoch)
            self._non_finite(f"training loss at epoch {epoch + 1} step {step + 1}")
        return stop

    def _flush_timer(self) -> None:
        steps, samples, seconds = self.timer.flush()
        self.acc.timed_steps += steps
        self.acc.timed_samples += samples
        self.acc.timed_seconds += seconds

    def evaluate(self) -> dict[str, float]:
        with self.optimizer.evaluation_weights():
            record = self._evaluate()
        if self.cfg.trainer.get("evaluate_variants", True):  # e.g. MESA's EMA: test_acc_ema
            for name, weights in evaluation_variants(self.optimizer).items():
                with weights():
                    record.update({f"{k}_{name}": v for k, v in self._evaluate().items()})
        return record

    def _final_evaluation(self) -> dict[str, Any]:
        """The hooks the method declares for before the final evaluation (MSAM: BatchNorm
        statistics recomputed at w), then the test set again; {} when there are none. Both
        numbers go to summary.json: test_acc_final (after) and test_acc_final_before_hooks;
        the model so evaluated to checkpoints/final.pt."""
        names = self.final_hooks
        if not names or not self.state.history:
            return {}
        before = self.state.history[-1]
        with self.optimizer.evaluation_weights():
            for name in names:
                self._say(f"{name}: {FINAL_HOOKS[name](self.run, self.state.epoch)}")
            after = self._evaluate()
        self._say(f"after {', '.join(names)}: test acc {before['test_acc']:.2f} -> {after['test_acc']:.2f}")
        if self.run.dist.is_main:  # the model as finally evaluated (last.pt keeps the state to resume)
            self._write("final.pt", lambda: best_state(self.run, self.state.epoch, after["test_acc"]))
        return {"final_hooks": names, **after}

    def _evaluate(self) -> dict[str, float]:
        """Test metrics, and the validation split's (val_*) where the dataset carved one: what
        model selection may read (esam.leaderboard never reads test_*)."""
        limit = self.cfg.trainer.limit_test_batches
        out = score_loader(self.run, self.run.data.test, "test", limit)
        if getattr(self.run.data, "val", None) is not None:
            out.update(score_loader(self.run, self.run.data.val, "val", limit))
        return out

    def _end_epoch(self, record: dict[str, Any], logger) -> None:
        """Count the epoch as done, write its line everywhere, then checkpoint."""
        s, tc = self.state, self.cfg.trainer
        s.epoch += 1
        s.step_in_epoch = 0
        self.acc = None
        record["epoch"] = s.epoch
        s.history.append(record)
        is_best = record["test_acc"] > s.best_acc
        s.best_acc = max(s.best_acc, record["test_acc"])
        self.files.append(record)
        if self.run.dist.is_main:
            logger.log_epoch(record)
        self._say(epoch_line(record, self.run.epochs_label, self.run.budget))
        every = tc.checkpoint_every
        if (every > 0 and s.epoch % every == 0) or self._finished():
            self.save_checkpoint()
        if is_best and tc.keep_best and self.run.dist.is_main:
            self._write("best.pt", lambda: best_state(self.run, s.epoch, record["test_acc"]))

    # -- stopping ---------------------------------------------------------------------------
    def save_checkpoint(self, name: str = "last.pt") -> Path | None:
        # Never overwrite the last good state with diverged weights (a finite loss can precede them).
        if not bool(torch.stack([p.isfinite().all() for p in self.model.parameters()]).all()):
            self._non_finite(f"weights after step {self.state.global_step}")
        if not self.run.dist.is_main:
            return None
        return self._write(name, lambda: checkpoint_state(self.run, self.state, self.acc, self._train_time()))

    def _write(self, name: str, state) -> Path:
        """Save ``state()`` atomically, built and written with the weights that are evaluated
        (a method that trains at perturbed weights, MSAM, moves them back inside)."""
        path = self.run.checkpoint_dir / name
        with self.optimizer.evaluation_weights():
            atomic_torch_save(state(), path)
        return path

    def _save_and_exit(self, saved: str) -> None:
        """The one way a stop signal ends a run: checkpoint, say how to continue, hand the
        signal to the handler that was there before ours (submitit's requeue), exit."""
        self.save_checkpoint()
        self._say(f"received {self.signals.received}: {saved}; to continue, run: "
                  f"{resume_command(self.run.run_dir)}")
        self.signals.chain()
        sys.exit(self.signals.exit_code)

    def _non_finite(self, where: str) -> None:
        last = self.run.checkpoint_dir / "last.pt"
        kept = (f"the last good state is in {last}" if last.is_file()
                else "no checkpoint was saved (trainer.checkpoint_every=0)")
        hint = "lower the lr or rho" + (", or use fp32" if self.run.precision not in ("fp32", "tf32") else "")
        raise NonFiniteLossError(f"non-finite {where}; the run stops here and {kept} ({hint})")

    # -- small helpers ----------------------------------------------------------------------
    def _train_time(self) -> float:
        elapsed = time.perf_counter() - self._t_start if self._t_start is not None else 0.0
        return self.state.train_time_s + elapsed

    def _progress_bar(self):
        if not (self.cfg.trainer.progress and self.run.dist.is_main):
            return None
        from tqdm import tqdm

        return tqdm(total=self.run.steps_per_epoch, initial=self.state.step_in_epoch,
                    desc=f"epoch {self.state.epoch + 1}/{self.run.epochs_label}",
                    leave=False, mininterval=1.0, file=sys.stderr)

    def _say(self, msg: str) -> None:
        if self.run.dist.is_main:
            say(msg)
