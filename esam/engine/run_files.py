"""The run folder's files and the console: metrics.jsonl (one line per epoch), summary.json
(written once, when the run completes) and the lines a user reads.

Console lines go through ``logging`` when the program configured it (``python -m esam.train``:
Hydra sends them to the console and to the run folder's ``train.log``), else to stdout.
"""
from __future__ import annotations

import json
import logging
import math
import os
import platform
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from esam.loggers import stat_key
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


def summarize(run: Any, history: list[dict[str, Any]], *, train_time_s: float, pieces: int,
              final: dict[str, Any] | None = None) -> dict[str, Any]:
    """summary.json: the run's results, its cost and where it ran (what esam.report reads).

    ``final``: the test metrics after the method's before-final-evaluation hooks (MSAM's BN
    recalibration); they become the ``*_final`` numbers, the last epoch's stay as
    ``*_final_before_hooks``. Weights evaluated beside the model's (MESA's EMA: ``test_acc_ema``
    in the epoch lines) get ``test_acc_<name>_final`` and ``_best``."""
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
        **_variant_results(h),
        **_after_hooks(h[-1], final),
    }


def throughput(img_per_s: float | None, unit: str = "img/s", untimed: str = "run") -> str:
    """``2012 img/s``, or why there is no number: no step of the ``untimed`` (run, epoch) was timed,
    all of them fell inside the timing warm-up (``trainer.timing_warmup_steps``)."""
    if img_per_s is None or (isinstance(img_per_s, float) and math.isnan(img_per_s)):
        return f"{unit} n/a ({untimed} shorter than the timing warm-up, trainer.timing_warmup_steps)"
    return f"{img_per_s:.0f} {unit}"


def _variant_results(h: list[dict[str, Any]]) -> dict[str, Any]:
    """test_acc_<name>_final / _best for every evaluated variant (test_acc_<name> in the last epoch)."""
    out: dict[str, Any] = {}
    for key in h[-1]:
        if key.startswith("test_acc_") and not key.startswith("test_acc5"):
            seen = [r[key] for r in h if key in r]
            out[f"{key}_final"], out[f"{key}_best"] = h[-1][key], max(seen)
    return out


def _after_hooks(last: dict[str, Any], final: dict[str, Any] | None) -> dict[str, Any]:
    if not final:
        return {"final_hooks": []}
    return {"final_hooks": list(final["final_hooks"]),
            "test_acc_final": final["test_acc"], "test_acc5_final": final["test_acc5"],
            "test_acc_final_before_hooks": last["test_acc"], "test_acc5_final_before_hooks": last["test_acc5"]}


def epoch_line(r: dict[str, Any], epochs: int, budget: float | None = None) -> str:
    """The console line of one epoch."""
    sharpness = stat_key("sharpness")
    extra = f" sharpness {r[sharpness]:.4f}" if sharpness in r else ""
    extra += "".join(f"  {k[len('test_acc_'):]} acc {v:.2f}" for k, v in r.items()
                     if k.startswith("test_acc_"))  # weights scored beside the model's (MESA: ema)
    if budget is not None:
        extra += f"  compute {r['compute_used']:.2f}/{budget:g} SGD epochs"
    return (f"epoch {r['epoch']:>3}/{epochs}  lr {r['lr']:.4f}  "
            f"train loss {r['train_loss']:.4f} acc {r['train_acc']:.2f}  "
            f"test loss {r['test_loss']:.4f} acc {r['test_acc']:.2f} top5 {r['test_acc5']:.2f}  "
            f"{throughput(r['train_img_per_s'], untimed='epoch')}  {r['epoch_time_s']:.1f}s{extra}")
