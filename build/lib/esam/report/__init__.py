"""Run folders (or wandb runs) -> the paper-style tables: test accuracy as mean ± std over seeds,
training throughput, compute relative to SGD, at equal epochs and at equal compute.

    python -m esam.report multirun/digits --out results/digits
    python -m esam.report outputs multirun --out results/table          (make table)
    python -m esam.report --wandb ENTITY/PROJECT [--group NAME] [--push] --out results/wandb

Every ``summary.json`` below the given folders is one run; ``metrics.jsonl`` beside it gives the
curves. Runs form one row (a cell) when they differ only in the seed: same experiment, dataset and
its settings, model, hardware label (device model, ranks, precision, threads), optimizer label and
its hyper-parameters, batch size, and epochs or compute budget. A seed that appears twice in a cell
counts once (the newest run), with a warning. Runs with ``trainer.budget`` go to the "at equal
compute" table, the others to "at equal epochs". Written to ``--out``: table.md, table.csv (all
numeric columns per cell), runs.csv (one line per run, ``used`` says whether it was counted),
acc_vs_throughput.png, curves.png, and pareto.png (accuracy against compute used and wall time).

Rooms: runs (reading, cells, repeated seeds), tables (aggregation, SGD baselines, Markdown),
plots, wandb_runs (the public API), cli (the files and the command line).
"""
from esam.report.cli import main, report_markdown, write_report
from esam.report.plots import pareto_front, plot_acc_vs_throughput, plot_curves, plot_pareto
from esam.report.runs import CELL_KEYS, find_summaries, hardware_label, load_runs, run_row, runs_frame, select_runs
from esam.report.tables import (PAPER, SGDBaseline, cell_table, cells_markdown, equal_compute_markdown,
                                equal_compute_table, extra_vs_sgd_per_run)
from esam.report.wandb_runs import curves_from_wandb, load_wandb, push_extra_vs_sgd, row_from_wandb

__all__ = ["CELL_KEYS", "PAPER", "SGDBaseline", "cell_table", "cells_markdown", "curves_from_wandb", "equal_compute_markdown",
           "equal_compute_table", "extra_vs_sgd_per_run", "find_summaries", "hardware_label", "load_runs",
           "load_wandb", "main", "pareto_front", "plot_acc_vs_throughput", "plot_curves", "plot_pareto",
           "push_extra_vs_sgd", "report_markdown", "row_from_wandb", "run_row", "runs_frame", "select_runs",
           "write_report"]
