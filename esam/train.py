"""Hydra entry point: compose -> build -> Trainer -> summary.

    python -m esam.train dataset=cifar10 model=resnet18 optimizer=esam trainer.epochs=2
    python -m esam.train -m optimizer=sgd,sam,esam seed=0,1,2
"""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import esam.config  # noqa: F401  (registers the schemas before Hydra composes)
from esam.errors import UserError

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def run(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Train one run described by ``cfg`` into ``run_dir``; returns the summary."""
    from esam.trainer import Trainer

    return Trainer(cfg, run_dir).fit()


@hydra.main(config_path=CONFIG_DIR, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    run_dir = HydraConfig.get().runtime.output_dir
    try:
        summary = run(cfg, run_dir)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    print(f"done: test acc {summary['test_acc_final']:.2f}% (best {summary['test_acc_best']:.2f}%), "
          f"{summary['img_per_s']:.0f} train img/s, run folder {run_dir}", flush=True)
    return summary["test_acc_best"]  # for Hydra sweepers that optimise a value


if __name__ == "__main__":
    main()
