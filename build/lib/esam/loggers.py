"""Where per-epoch metrics go besides the run folder: nowhere (``none``) or Weights & Biases.

The run folder's metrics.jsonl and summary.json are written by the trainer whatever the logger
(and whatever wandb does); a logger only mirrors them. Keys map ``train_loss`` -> ``train/loss``.
wandb never stops a run: without an API key, or when it cannot start online within
``WANDB_INIT_TIMEOUT`` seconds, the run logs offline (``wandb sync`` uploads it later), and if
that fails too, to its folder only; each case prints one warning that says what to do.
"""
from __future__ import annotations

import math
import os
import sys
from typing import Any

from esam.errors import UserError

PREFIXES = ("train", "test", "perf", "sam", "time", "compute")
# Keys without a prefix of their own; esam.report and the dashboard read these names.
RENAMED = {"img_per_s": "perf/img_per_s", "step_ms": "perf/step_ms", "wall_time_s": "perf/wall_time_s",
           "budget": "compute/budget"}

# What a dashboard plots accuracy against compute with, across a group (in each run's summary;
# scripts/wandb_dashboard.py builds its panels from these names).
COMPUTE_USED = "compute/used"                 # SGD-epoch equivalents the run spent (summary compute_used)
COMPUTE_EXTRA_PCT = "compute/extra_vs_sgd_pct"  # cost-unit overhead vs SGD per sample, % (SGD 0, SAM ~100)
WALL_TIME = "perf/wall_time_s"                # measured training wall time, s (summary wall_time_s)
ACC_FINAL = "test/acc_final"                  # test accuracy % at the end (what the budget bought)
ACC_BEST = "test/acc_best"                    # best epoch's test accuracy %
BUDGET = "compute/budget"                     # trainer.budget (SGD-epochs), null without one
COMPUTE_SUMMARY_KEYS = (COMPUTE_USED, COMPUTE_EXTRA_PCT, WALL_TIME, ACC_FINAL, ACC_BEST, BUDGET)

# Seconds wandb.init may take to reach the server before the run goes offline (wandb's own
# default is 90 s, and a machine without network retries for minutes).
DEFAULT_INIT_TIMEOUT_S = 30.0


def wandb_key(key: str) -> str:
    """``test_acc_best`` -> ``test/acc_best``, ``img_per_s`` -> ``perf/img_per_s``."""
    if key in RENAMED:
        return RENAMED[key]
    head, _, tail = key.partition("_")
    return f"{head}/{tail}" if head in PREFIXES and tail else key


def summary_key(key: str) -> str:
    """The inverse of :func:`wandb_key`: ``test/acc_best`` -> ``test_acc_best``."""
    for ours, theirs in RENAMED.items():
        if key == theirs:
            return ours
    head, _, tail = key.partition("/")
    return f"{head}_{tail}" if head in PREFIXES and tail else key


def compute_extra_pct(summary: dict[str, Any]) -> float:
    """Compute per sample beyond SGD's, in % (SGD 0, SAM about 100): ``compute_used`` (SGD-epochs)
    over the epochs of data the run went through. NaN where that is unknown: older summaries, and
    a budget run that stopped mid-epoch without saying how far (``epochs_done``)."""
    used = summary.get("compute_used")
    done = summary.get("epochs_done")
    if done is None and summary.get("budget") is None:
        done = summary.get("epochs")  # a run of fixed length ran whole epochs
    if not isinstance(used, (int, float)) or not isinstance(done, (int, float)) or done <= 0:
        return math.nan
    return 100.0 * (used / done - 1.0)


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def has_api_key(wandb: Any) -> bool | None:
    """Whether wandb has credentials for its server, asked without prompting or the network;
    None where this wandb version cannot tell (then wandb.init says)."""
    try:
        from wandb.sdk.lib.wbauth.authenticate import authenticate_session

        host = wandb.Settings().base_url
        return authenticate_session(host=host, source="esam", prompt=False, update_session=False) is not None
    except Exception:  # another wandb version, or a malformed key: let wandb.init decide
        return None


class NullLogger:
    run_id: str | None = None

    def log_epoch(self, record: dict[str, Any]) -> None:
        pass

    def log_summary(self, summary: dict[str, Any]) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


class WandbLogger(NullLogger):
    """One wandb run per training run; group = experiment, tags = dataset/model/optimizer."""

    def __init__(self, *, project: str, entity: str | None, mode: str | None, name: str, group: str,
                 tags: list[str], config: dict[str, Any], run_dir: str, job_type: str = "train",
                 run_id: str | None = None, init_timeout: float | None = None) -> None:
        mode = mode or os.environ.get("WANDB_MODE") or "online"
        if mode not in ("online", "offline", "disabled"):
            raise UserError(f"logger.mode={mode!r} is not one of online, offline, disabled")
        self.run = None
        try:
            import wandb
        except ImportError:
            _warn("wandb is not installed (pip install wandb), so this run logs to its folder only "
                  "(metrics.jsonl, summary.json); use logger=none to skip wandb")
            return
        self.wandb = wandb
        timeout = float(init_timeout or os.environ.get("WANDB_INIT_TIMEOUT") or DEFAULT_INIT_TIMEOUT_S)
        kwargs = dict(project=project, entity=entity, name=name, group=group, tags=tags, job_type=job_type,
                      config=config, dir=run_dir, id=run_id, resume="allow" if run_id else None,
                      reinit="finish_previous")
        offline_note = (f"logging this run offline into {run_dir}/wandb instead (upload it later with "
                        "`wandb sync`)")
        if mode == "online" and has_api_key(wandb) is False:
            _warn(f"wandb has no API key here, so {offline_note}; run `wandb login` to log online, "
                  "or set WANDB_MODE=offline to go offline without this warning")
            mode = "offline"
        try:
            self.run = wandb.init(mode=mode, settings=wandb.Settings(init_timeout=timeout), **kwargs)
        except Exception as first:
            why = f"{type(first).__name__}: {str(first).strip().splitlines()[0] if str(first).strip() else ''}"
            if mode == "online":
                try:
                    self.run = wandb.init(mode="offline", settings=wandb.Settings(init_timeout=timeout), **kwargs)
                    hint = ("run `wandb login`" if "API key" in str(first)
                            else f"check the network, or raise WANDB_INIT_TIMEOUT (now {timeout:g} s)")
                    _warn(f"wandb could not start an online run ({why}), so {offline_note}; {hint}, "
                          "or set WANDB_MODE=offline to go offline without this warning")
                except Exception as second:
                    why += f"; offline: {type(second).__name__}: {second}"
            if self.run is None:
                _warn(f"wandb could not start a run ({why}), so this run logs to its folder only "
                      "(metrics.jsonl, summary.json); set WANDB_MODE=disabled or logger=none to skip wandb")
                return
        self.run_id = self.run.id
        self._guard(self._define_metrics)

    def _define_metrics(self) -> None:
        self.run.define_metric("epoch")
        self.run.define_metric("*", step_metric="epoch")
        self.run.define_metric("test/acc", summary="max")
        self.run.define_metric("test/acc5", summary="max")
        self.run.define_metric("train/loss", summary="min")

    def _guard(self, fn, *args: Any) -> None:
        """Run a wandb call; if it fails, say so once and stop mirroring (the run folder has it all)."""
        if self.run is None:
            return
        try:
            fn(*args)
        except Exception as e:
            _warn(f"wandb failed ({type(e).__name__}: {e}); the run goes on and its folder keeps every "
                  "metric (metrics.jsonl, summary.json), but nothing more goes to wandb")
            self.run = None

    def log_epoch(self, record: dict[str, Any]) -> None:
        self._guard(lambda: self.run.log({wandb_key(k): v for k, v in record.items()
                                          if isinstance(v, (int, float))}))

    def log_summary(self, summary: dict[str, Any]) -> None:
        """Every scalar of summary.json, plus the compute overhead vs SGD (COMPUTE_EXTRA_PCT), so
        a dashboard can put accuracy against compute for a whole group."""
        values = {wandb_key(k): v for k, v in summary.items() if isinstance(v, (int, float, str))}
        extra = compute_extra_pct(summary)
        if not math.isnan(extra):
            values[COMPUTE_EXTRA_PCT] = extra
        self._guard(lambda: self.run.summary.update(values))

    def finish(self, exit_code: int = 0) -> None:
        self._guard(lambda: self.run.finish(exit_code=exit_code))
        self.run = None


def build_logger(cfg: Any, *, name: str, group: str, tags: list[str], config: dict[str, Any],
                 run_dir: str, run_id: str | None = None) -> NullLogger:
    if cfg.name == "none":
        return NullLogger()
    if cfg.name == "wandb":
        return WandbLogger(project=cfg.project, entity=cfg.entity, mode=cfg.mode, name=name,
                           group=group, tags=tags + list(cfg.tags), config=config,
                           run_dir=run_dir, run_id=run_id)
    raise UserError(f"logger.name={cfg.name!r} is not one of none, wandb")
