"""``python -m esam.bench [key=value ...]``: Hydra entry point of the overhead benchmark (conf/bench.yaml)."""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

import esam.config  # noqa: F401  (registers bench_schema before Hydra composes)
from esam.bench.runner import run
from esam.errors import UserError


@hydra.main(config_path="../../conf", config_name="bench", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
