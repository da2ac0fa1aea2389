"""Where per-epoch metrics go besides the run folder: nowhere (``none``) or Weights & Biases.

The run folder's metrics.jsonl and summary.json are written by the trainer whatever
the logger; a logger only mirrors them. Keys map ``train_loss`` -> ``train/loss``.
"""
from __future__ import annotations

import os
from typing import Any

from esam.errors import UserError

PREFIXES = ("train", "test", "perf", "sam", "time", "compute")
# Keys without a prefix of their own; esam.report and the dashboard read these names.
RENAMED = {"img_per_s": "perf/img_per_s", "step_ms": "perf/step_ms", "wall_time_s": "perf/wall_time_s"}


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
                 run_id: str | None = None) -> None:
        import wandb

        mode = mode or os.environ.get("WANDB_MODE") or "online"
        if mode not in ("online", "offline", "disabled"):
            raise UserError(f"logger.mode={mode!r} is not one of online, offline, disabled")
        self.wandb = wandb
        self.run = wandb.init(
            project=project, entity=entity, mode=mode, name=name, group=group, tags=tags,
            job_type=job_type, config=config, dir=run_dir, id=run_id,
            resume="allow" if run_id else None, reinit="finish_previous",
        )
        self.run_id = self.run.id if self.run is not None else None
        self.run.define_metric("epoch")
        self.run.define_metric("*", step_metric="epoch")
        self.run.define_metric("test/acc", summary="max")
        self.run.define_metric("test/acc5", summary="max")
        self.run.define_metric("train/loss", summary="min")

    def log_epoch(self, record: dict[str, Any]) -> None:
        self.run.log({wandb_key(k): v for k, v in record.items() if isinstance(v, (int, float))})

    def log_summary(self, summary: dict[str, Any]) -> None:
        for k, v in summary.items():
            if isinstance(v, (int, float, str)):
                self.run.summary[wandb_key(k)] = v

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


def build_logger(cfg: Any, *, name: str, group: str, tags: list[str], config: dict[str, Any],
                 run_dir: str, run_id: str | None = None) -> NullLogger:
    if cfg.name == "none":
        return NullLogger()
    if cfg.name == "wandb":
        return WandbLogger(project=cfg.project, entity=cfg.entity, mode=cfg.mode, name=name,
                           group=group, tags=tags + list(cfg.tags), config=config,
                           run_dir=run_dir, run_id=run_id)
    raise UserError(f"logger.name={cfg.name!r} is not one of none, wandb")
