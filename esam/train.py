"""Hydra entry point: compose -> build -> Trainer -> summary.

    python -m esam.train dataset=cifar10 model=resnet18 optimizer=esam trainer.epochs=2
    python -m esam.train -m optimizer=sgd,sam,esam seed=0,1,2
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

import esam.config  # noqa: F401  (registers the schemas before Hydra composes)
from esam.errors import UserError

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")

# The trainer checkpoints on SIGUSR1 (and SIGTERM); make it the signal submitit asks Slurm for
# (`--signal=USR1@signal_delay_s`) and listens to. Set before the launcher imports submitit.
os.environ.setdefault("SUBMITIT_PREEMPT_SIGNAL", "USR1")


def output_dir_problem(path: str | Path) -> str | None:
    """Why the folder ``path`` cannot be created or written, or None if it can."""
    path = Path(path).absolute()
    for folder in (path, *path.parents):
        if folder.exists():
            if not folder.is_dir():
                return f"{folder} is a file, not a folder"
            if not os.access(folder, os.W_OK | os.X_OK):
                return f"{folder} is not writable"
            return None
    return None


class CheckOutputDir(Callback):
    """Hydra creates the run folder before ``main`` runs and reports a failure as a traceback;
    this callback (conf/train.yaml: hydra.callbacks) checks first and says it in one sentence."""

    @staticmethod
    def _check(path: str) -> None:
        problem = output_dir_problem(path)
        if problem is not None:
            print(f"error: output folder {path} cannot be created: {problem}", file=sys.stderr, flush=True)
            sys.exit(2)

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config.hydra.sweep.dir)


def run(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Train one run described by ``cfg`` into ``run_dir``; returns the summary."""
    from esam.trainer import Trainer

    return Trainer(cfg, run_dir).fit()


@hydra.main(config_path=CONFIG_DIR, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    run_dir = HydraConfig.get().runtime.output_dir
    if cfg.trainer.resume is None and os.environ.get("SUBMITIT_EXECUTOR"):
        # A submitit job may be requeued (time limit, pre-emption) into this same folder: it must
        # continue from checkpoints/last.pt, not start over. A first run finds none and starts fresh.
        cfg.trainer.resume = "auto"
    try:
        summary = run(cfg, run_dir)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    if int(os.environ.get("RANK", "0")) == 0:  # one line per run, not one per DDP rank
        print(f"done: test acc {summary['test_acc_final']:.2f}% (best {summary['test_acc_best']:.2f}%), "
              f"{summary['img_per_s'] or float('nan'):.0f} train img/s, run folder {run_dir}", flush=True)
    return summary["test_acc_best"]  # for Hydra sweepers that optimise a value


if __name__ == "__main__":
    main()
