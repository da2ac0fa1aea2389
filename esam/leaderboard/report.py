"""The board's files: leaderboard.csv (the issue's columns), trials.csv and runs.csv (every run),
table.md (the tables the README quotes), profiles.png, test_acc.png, compute_to_target.png."""
from __future__ import annotations

import csv
import json
import math
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np

from esam.leaderboard import score
from esam.leaderboard.plan import Job, Suite

COLUMNS = ["workload", "method", "trials", "selected_hparams", "seeds", "target", "compute_to_target",
           "reached_target", "test_acc_mean", "test_acc_std", "test_acc_ci_low", "test_acc_ci_high"]


def build(suite: Suite, trials: list[Job], finals: list[Job], selected: dict, targets: dict[str, float]) -> dict[str, Any]:
    """Every number of the board, from the run folders."""
    trial_rows = []
    for j in trials:
        h = score.read_validation(j.run_dir)
        trial_rows.append({"workload": j.workload, "method": j.method, "trial": j.index,
                           "hparams": json.dumps(j.hparams, sort_keys=True),
                           "val_acc_final": score.final_val(h), "status": "done" if h else "failed",
                           "selected": selected.get((j.workload, j.method)) is not None
                           and selected[(j.workload, j.method)] == j.hparams})
    run_rows, board = [], []
    for w in suite.workloads:
        for m in suite.methods:
            mine = [j for j in finals if j.workload == w and j.method == m]
            tests, ctts, walls = [], [], []
            for j in mine:
                h = score.read_validation(j.run_dir)
                t = score.read_test(j.run_dir)
                c, wall = score.compute_to_target(h, targets[w])
                run_rows.append({"workload": w, "method": m, "seed": j.index, "val_acc_final": score.final_val(h),
                                 "test_acc_final": t, "compute_to_target": c, "wall_to_target_s": wall,
                                 "compute_used": h[-1]["compute_used"] if h else None,
                                 "wall_time_s": h[-1]["wall_time_s"] if h else None, "status": "done" if h else "failed"})
                ctts.append(c)
                walls.append(wall)
                if t is not None:
                    tests.append(t)
            mean, std, lo, hi = score.mean_std_ci(tests)
            ctt = score.median_with_inf(ctts) if mine else math.inf
            board.append({"workload": w, "method": m,
                          "trials": sum(1 for r in trial_rows if r["workload"] == w and r["method"] == m),
                          "selected_hparams": json.dumps(selected.get((w, m)), sort_keys=True),
                          "seeds": len(tests), "target": targets[w], "compute_to_target": ctt,
                          "reached_target": math.isfinite(ctt),
                          "test_acc_mean": mean, "test_acc_std": std, "test_acc_ci_low": lo, "test_acc_ci_high": hi,
                          # beside the csv's columns, for the tables:
                          "_reached": sum(math.isfinite(c) for c in ctts), "_wall": score.median_with_inf(walls),
                          "_ctt_seeds": ctts, "_tests": tests})
    times = {w: {r["method"]: r["compute_to_target"] for r in board if r["workload"] == w} for w in suite.workloads}
    ratios = score.performance_ratios(times)
    scores = {m: score.profile_score(ratios, m) for m in suite.methods}
    return {"trials": trial_rows, "runs": run_rows, "board": board, "ratios": ratios, "scores": scores,
            "targets": targets}


def write(result: dict[str, Any], suite: Suite, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _csv(out / "leaderboard.csv", [{k: _fmt(r[k]) for k in COLUMNS} for r in result["board"]], COLUMNS)
    _csv(out / "trials.csv", [{k: _fmt(v) for k, v in r.items()} for r in result["trials"]])
    _csv(out / "runs.csv", [{k: _fmt(v) for k, v in r.items()} for r in result["runs"]])
    (out / "table.md").write_text(tables(result, suite))
    (out / "search_spaces.md").write_text(search_spaces(suite))
    plots(result, suite, out)


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return "inf" if v == math.inf else ("" if math.isnan(v) else f"{v:.4g}" if abs(v) < 1 else f"{v:.2f}")
    return v


def _csv(path: Path, rows: list[dict], columns: list[str] | None = None) -> None:
    columns = columns or (list(rows[0]) if rows else [])
    with open(path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=columns)
        wr.writeheader()
        wr.writerows(rows)


def _ctt(r: dict) -> str:
    c = r["compute_to_target"]
    return f"{c:.1f} ({r['_reached']}/{r['seeds'] or len(r['_ctt_seeds'])})" if math.isfinite(c) else \
        f"not reached ({r['_reached']}/{len(r['_ctt_seeds'])})"


def tables(result: dict[str, Any], suite: Suite) -> str:
    """Markdown: per workload its target and every method's row; the profile scores; ESAM vs SAM."""
    lines = [f"<!-- written by python -m esam.leaderboard --suite {suite.name}; do not edit -->", ""]
    for w in suite.workloads:
        rows = sorted([r for r in result["board"] if r["workload"] == w],
                      key=lambda r: -r["test_acc_mean"] if not math.isnan(r["test_acc_mean"]) else math.inf)
        lines += [f"### {w}: target {result['targets'][w]:.2f}% validation accuracy", "",
                  "| method | test acc % (mean ± std) | 95% bootstrap CI | compute to target, SGD-epochs (seeds reaching) "
                  "| wall to target, s | selected hparams |", "|---|---:|---:|---:|---:|---|"]
        for r in rows:
            wall = f"{r['_wall']:.1f}" if math.isfinite(r["_wall"]) else "–"
            hp = ", ".join(f"{k}={score_fmt(v)}" for k, v in json.loads(r["selected_hparams"] or "{}").items()) \
                if r["selected_hparams"] != "null" else "(every trial failed)"
            lines.append(f"| {r['method']} | {r['test_acc_mean']:.2f} ± {r['test_acc_std']:.2f} | "
                         f"[{r['test_acc_ci_low']:.2f}, {r['test_acc_ci_high']:.2f}] | {_ctt(r)} | {wall} | {hp} |")
        lines.append("")
    lines += ["### Performance-profile score (area under rho(tau), tau in [1, 4], over the workloads)", "",
              "| method | score | " + " | ".join(f"ratio on {w}" for w in suite.workloads) + " |",
              "|---|---:|" + "---:|" * len(suite.workloads)]
    for m in sorted(suite.methods, key=lambda m: -result["scores"][m]):
        ratios = " | ".join(f"{result['ratios'][w][m]:.2f}" if math.isfinite(result['ratios'][w][m]) else "inf"
                            for w in suite.workloads)
        lines.append(f"| {m} | {result['scores'][m]:.3f} | {ratios} |")
    lines += ["", "### ESAM − SAM and each method − SGD: test accuracy difference, points (95% bootstrap CI)", "",
              "| workload | " + " | ".join(f"{m} − sgd" for m in suite.methods if m != suite.baseline) + " | esam − sam |",
              "|---|" + "---:|" * len(suite.methods)]
    for w in suite.workloads:
        by = {r["method"]: r["_tests"] for r in result["board"] if r["workload"] == w}
        cells = [_diff(by.get(m), by.get(suite.baseline)) for m in suite.methods if m != suite.baseline]
        cells.append(_diff(by.get("esam"), by.get("sam")))
        lines.append(f"| {w} | " + " | ".join(cells) + " |")
    lines += ["", _provenance(), ""]
    return "\n".join(lines)


def search_spaces(suite: Suite) -> str:
    """The declared spaces (conf/search_space/<method>.yaml) as one table."""
    from esam.leaderboard.space import load_space

    lines = [f"<!-- written by python -m esam.leaderboard --suite {suite.name}; do not edit -->", "",
             f"{suite.trials} scrambled-Sobol trials per method per workload from these spaces "
             "(conf/search_space/<method>.yaml); everything else is the method's conf/optimizer default.", "",
             "| method | tuned knobs (range, scale) | fixed for every trial |", "|---|---|---|"]
    for m in suite.methods:
        sp = load_space(m)
        knobs = ", ".join(f"{p.name} [{score_fmt(p.low)}, {score_fmt(p.high)}]"
                          f"{' log' if p.log else ' int' if p.integer else ''}" for p in sp.params)
        fixed = ", ".join(f"{k}={v}" for k, v in sp.fixed.items()) or "–"
        lines.append(f"| {m} | {knobs} | {fixed} |")
    return "\n".join(lines) + "\n"


def _diff(a, b) -> str:
    if not a or not b or len(a) < 2 or len(b) < 2:
        return "–"
    d, lo, hi = score.diff_ci(a, b)
    mark = "**" if lo > 0 or hi < 0 else ""
    return f"{mark}{d:+.2f} [{lo:+.2f}, {hi:+.2f}]{mark}"


def score_fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _provenance() -> str:
    import torch

    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    return (f"Machine: {platform.node()}, {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
            f"torch {torch.__version__}, one thread per run; load average at report time {load[0]:.1f}. "
            "Wall times are this shared machine's and move with its load; compute is counted.")


def plots(result: dict[str, Any], suite: Suite, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = suite.methods
    colors = {m: plt.get_cmap("tab20")(i % 20) for i, m in enumerate(methods)}
    taus = np.linspace(1.0, score.TAU_MAX, 601)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, m in enumerate(sorted(methods, key=lambda m: -result["scores"][m])):
        rho = score.profile(result["ratios"], m, taus)
        ax.step(taus, rho + 0.004 * (i - len(methods) / 2), where="post", color=colors[m],
                label=f"{m} ({result['scores'][m]:.2f})")
    ax.set(xlabel="tau: compute-to-target within tau x the best method's", ylabel="share of workloads",
           title="Performance profiles (score = normalised area)", ylim=(-0.05, 1.05))
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "profiles.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(suite.workloads), figsize=(4.2 * len(suite.workloads), 4.2), squeeze=False)
    for ax, w in zip(axes[0], suite.workloads):
        rows = [r for r in result["board"] if r["workload"] == w]
        x = np.arange(len(rows))
        mean = np.array([r["test_acc_mean"] for r in rows])
        lo = np.array([r["test_acc_ci_low"] for r in rows])
        hi = np.array([r["test_acc_ci_high"] for r in rows])
        ax.errorbar(x, mean, yerr=[mean - lo, hi - mean], fmt="o", capsize=3, color="k")
        ax.set_xticks(x, [r["method"] for r in rows], rotation=60, fontsize=8)
        ax.set(title=f"{w}: test acc at full budget", ylabel="test accuracy % (95% bootstrap CI)")
    fig.tight_layout()
    fig.savefig(out / "test_acc.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(suite.workloads), figsize=(4.2 * len(suite.workloads), 4.2), squeeze=False)
    for ax, w in zip(axes[0], suite.workloads):
        rows = [r for r in result["board"] if r["workload"] == w]
        for i, r in enumerate(rows):
            c = [v for v in r["_ctt_seeds"] if math.isfinite(v)]
            ax.scatter([i] * len(c), c, s=12, color=colors[r["method"]])
            if len(c) < len(r["_ctt_seeds"]):
                ax.annotate(f"{len(r['_ctt_seeds']) - len(c)}x", (i, 0), fontsize=7, ha="center", color="red")
        ax.set_xticks(range(len(rows)), [r["method"] for r in rows], rotation=60, fontsize=8)
        ax.set(title=f"{w}: compute to target", ylabel="SGD-epochs (per seed; red: seeds not reaching)")
        ax.set_ylim(bottom=-1)
    fig.tight_layout()
    fig.savefig(out / "compute_to_target.png", dpi=120)
    plt.close(fig)
