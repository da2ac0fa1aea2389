"""Checkpoints: what a run's state is, the check that a checkpoint belongs to this run, and
which checkpoint ``trainer.resume`` means.

The unit of resuming is the run folder: ``trainer.resume=<run folder>`` continues the run in
that folder (``python -m esam.train`` then makes it the Hydra run folder too), which is what a
Slurm job requeued by submitit does with ``trainer.resume=auto``. ``trainer.resume=<file.pt>``
starts a new folder from that checkpoint.
"""
from __future__ import annotations

import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from esam.engine.monitor import EpochAccumulator
from esam.errors import UserError
from esam.runtime import CHECKPOINT_FORMAT, rng_states, set_rng_states

# What a checkpoint's run and the resuming run must share (epochs, device, logging may differ).
RESUME_MUST_MATCH = ("dataset.name", "model.name", "model.args", "optimizer.name")
NO_RESUME = (None, "", "none")


@dataclass
class Progress:
    """Where a run is; saved in every checkpoint and restored when resuming."""

    epoch: int = 0               # epochs completed
    step_in_epoch: int = 0       # steps completed in the current epoch (mid-epoch checkpoints)
    global_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_acc: float = -1.0
    train_time_s: float = 0.0    # wall time of the earlier pieces of a resumed run
    pieces: int = 1
    wandb_id: str | None = None
    compute_units: float = 0.0   # cost units x samples spent so far, all ranks (compute_used x epoch_units)


def checkpoint_state(run: Any, progress: Progress, acc: EpochAccumulator | None, train_time_s: float) -> dict:
    """Everything needed to continue ``run`` exactly where it is (weights, optimizer, schedule, RNGs)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler is not None else None,
        **{k: v for k, v in asdict(progress).items() if k != "train_time_s"},
        "train_time_s": train_time_s,
        "rng": rng_states(),
        "epoch_accumulator": acc.to_state() if acc is not None and progress.step_in_epoch > 0 else None,
        "config": OmegaConf.to_container(run.cfg, resolve=True),
    }


def best_state(run: Any, epoch: int, test_acc: float) -> dict[str, Any]:
    """checkpoints/best.pt: the weights of the best epoch so far (for evaluation, not resuming)."""
    return {"format": CHECKPOINT_FORMAT, "model": run.model.state_dict(), "epoch": epoch, "test_acc": test_acc}


def _dig(d: Any, key: str) -> Any:
    for k in key.split("."):
        d = d.get(k) if isinstance(d, dict) else None
    return d


def check_same_run(saved: dict | None, now: dict) -> None:
    """Refuse to continue a checkpoint of another dataset, model or method: some would load
    without an error (e.g. SGD's state into SAM) and silently train something else."""
    for key in RESUME_MUST_MATCH if saved else ():
        if _dig(saved, key) != _dig(now, key):
            raise UserError(f"the checkpoint was trained with {key}={_dig(saved, key)!r} but this run has "
                            f"{key}={_dig(now, key)!r}; resume with the same {key.split('.')[0]} "
                            "or start a new run folder")


def restore(run: Any, ckpt: dict[str, Any]) -> tuple[Progress, EpochAccumulator | None]:
    """Load ``ckpt`` into the run's parts; returns its progress and its half-done epoch's sums."""
    check_same_run(ckpt.get("config"), OmegaConf.to_container(run.cfg, resolve=True))
    try:
        run.model.load_state_dict(ckpt["model"])
        run.optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, KeyError, ValueError) as e:
        raise UserError(f"checkpoint does not match this model/optimizer config ({str(e).splitlines()[0]})") from None
    run.scheduler.load_state_dict(ckpt["scheduler"])
    if run.scaler is not None and ckpt.get("scaler"):
        run.scaler.load_state_dict(ckpt["scaler"])
    set_rng_states(ckpt["rng"])
    progress = Progress(**{k: ckpt[k] for k in ("epoch", "step_in_epoch", "global_step", "history",
                                                "best_acc", "train_time_s")},
                        pieces=ckpt["pieces"] + 1, wandb_id=ckpt.get("wandb_id"),
                        compute_units=ckpt.get("compute_units", 0.0))
    acc = ckpt.get("epoch_accumulator")
    if acc is None or progress.step_in_epoch == 0:
        return progress, None
    return progress, EpochAccumulator.from_state(acc, run.device)


def resolve_resume(resume: str | None, run_dir: Path) -> tuple[Path | None, str | None]:
    """(checkpoint to load or None, a line to tell the user or None) for ``trainer.resume``."""
    if resume in NO_RESUME:
        return None, None
    if resume == "auto":
        path = run_dir / "checkpoints" / "last.pt"
        if path.is_file():
            return path, None
        return None, (f"trainer.resume=auto: no checkpoint in {path.parent}, so this run starts at epoch 1 "
                      "(to continue an earlier run, pass trainer.resume=<its run folder>)")
    path = Path(resume)
    if path.is_dir():
        last = path / "checkpoints" / "last.pt"
        if not last.is_file():
            raise UserError(f"trainer.resume={resume}: that folder has no checkpoints/last.pt to continue from")
        return last, None
    return path, None


def saved_overrides(run_dir: Path) -> list[str] | None:
    """The command-line overrides the run in ``run_dir`` was started with (Hydra keeps them there)."""
    path = run_dir / ".hydra" / "overrides.yaml"
    try:
        overrides = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return [str(o) for o in overrides] if isinstance(overrides, list) else None


def resume_command(run_dir: Path, overrides: list[str] | None = None) -> str:
    """The command that continues the run in ``run_dir``: its own overrides + trainer.resume=<run_dir>."""
    if overrides is None:
        overrides = saved_overrides(run_dir)
    if overrides is None:
        head = "python -m esam.train <the overrides this run was started with>"
    else:
        keep = [o for o in overrides
                if o.lstrip("+~").split("=", 1)[0] not in ("trainer.resume", "hydra.run.dir")]
        head = " ".join(["python -m esam.train", *map(shlex.quote, keep)])
    return f"{head} {shlex.quote(f'trainer.resume={run_dir}')}"
