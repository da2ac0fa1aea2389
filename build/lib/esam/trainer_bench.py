"""Moved to :mod:`esam.bench.pipeline`; ``python -m esam.trainer_bench`` keeps working."""
from esam.bench.pipeline import compare, format_result, main

__all__ = ["compare", "format_result", "main"]

if __name__ == "__main__":
    main(prog="esam.trainer_bench")
