"""The run folder's files and the console: metrics.jsonl (one line per epoch), summary.json
(written once, when the run completes) and the lines a user reads.

Console lines go through ``logging`` when the program configured it (``python -m esam.train``:
Hydra sends them to the console and to the run folder's ``train.log``), else to stdout.
"""
from __future__ import annotations

import json
import logging
import os
import platform
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from esam.runtime import atomic_write_json, atomic_write_text, device_name, git_commit

log = logging.getLogger("esam")


def say(msg: str) -> None:
    """One line for the user: logged where logging is set up (console + train.log), else printed."""
    if log.isEnabledFor(logging.INFO) and log.hasHandlers():
        log.info(msg)
    else:
        print(msg, flush=True)


class RunFiles:
    """metrics.jsonl and summary.json in ``run_dir``; only the main rank writes."""

    def __init__(self, run_dir: Path, is_main: bool = True) -> None:
        self.run_dir, self.is_main = Path(run_dir), is_main
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.summary_path = self.run_dir / "summary.json"

    def start(self, history: list[dict[str, Any]]) -> None:
        """On (re)start the metrics file holds exactly the epochs the checkpoint has (none lost,
        none twice); summary.json marks a finished run, so one left from an earlier run goes."""
        if not self.is_main:
            return
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in history))
        self.summary_path.unlink(missing_ok=True)

    def append(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def write_summary(self, summary: dict[str, Any]) -> None:
        if self.is_main:
            atomic_write_json(self.summary_path, summary)


def summarize(run: Any, history: list[dict[str, Any]], *, train_time_s: float, pieces: int) -> dict[str, Any]:
    """summary.json: the run's results, its cost and where it ran (what esam.report reads)."""
    cfg, h = run.cfg, history
    timed_s = sum(r["timed_seconds"] for r in h)
    timed_steps = sum(r["timed_steps"] for r in h)
    imgs = [r["train_img_per_s"] for r in h if r["timed_steps"] > 0]
    best = max(h, key=lambda r: r["test_acc"])
    opt_cfg = cfg.optimizer
    return {
        "status": "completed",
        "name": cfg.name,
        "experiment": cfg.experiment_name,
        "dataset": cfg.dataset.name,
        "model": cfg.model.label,
        "optimizer": opt_cfg.label,
        "method": opt_cfg.name,
        "seed": cfg.seed,
        "epochs": len(h),
        "test_acc_final": h[-1]["test_acc"],
        "test_acc5_final": h[-1]["test_acc5"],
        "test_acc_best": best["test_acc"],
        "best_epoch": best["epoch"],
        "train_loss_final": h[-1]["train_loss"],
        "val_acc_final": h[-1].get("val_acc"),   # null without a validation split
        "val_loss_final": h[-1].get("val_loss"),
        "train_time_s": train_time_s,
        "train_step_time_s": timed_s,
        "img_per_s": sum(imgs) / len(imgs) if imgs else None,  # JSON null, not NaN
        "step_ms": 1000.0 * timed_s / timed_steps if timed_steps else None,
        "budget": run.budget,
        "compute_used": h[-1]["compute_used"],
        "wall_time_s": h[-1]["wall_time_s"],
        "train_steps": sum(r["train_steps"] for r in h),
        "batch_size": cfg.dataset.batch_size,
        "rho": opt_cfg.get("rho"), "beta": opt_cfg.get("beta"), "gamma": opt_cfg.get("gamma"),
        "num_params": run.num_params,
        "device": str(run.device.type),
        "device_name": device_name(run.device),
        "precision": run.precision,
        "channels_last": bool(cfg.model.channels_last),
        "world_size": run.dist.world_size,
        "num_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "hostname": platform.node(),
        "git_commit": git_commit(),
        "pieces": pieces,
        "run_dir": str(run.run_dir),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def epoch_line(r: dict[str, Any], epochs: int, budget: float | None = None) -> str:
    """The console line of one epoch."""
    extra = f" sharpness {r['sam_sharpness']:.4f}" if "sam_sharpness" in r else ""
    if budget is not None:
        extra += f"  compute {r['compute_used']:.2f}/{budget:g} SGD epochs"
    return (f"epoch {r['epoch']:>3}/{epochs}  lr {r['lr']:.4f}  "
            f"train loss {r['train_loss']:.4f} acc {r['train_acc']:.2f}  "
            f"test loss {r['test_loss']:.4f} acc {r['test_acc']:.2f} top5 {r['test_acc5']:.2f}  "
            f"{r['train_img_per_s'] or float('nan'):.0f} img/s  {r['epoch_time_s']:.1f}s{extra}")
