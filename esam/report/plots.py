"""The report's figures: accuracy vs throughput, accuracy per epoch, and accuracy vs compute
(Pareto). One panel per task (dataset and its settings, model, hardware label)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from esam.report.runs import CELL_KEYS, parse_settings

PANEL_KEYS = ["dataset", "data", "model", "hardware"]


def pareto_front(x: Any, y: Any) -> np.ndarray:
    """True where no other point has less or equal x and more or equal y, one of them strictly
    (less compute for at least as much accuracy); NaN points are never on the front."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = ~(np.isnan(x) | np.isnan(y))
    front = np.zeros(len(x), dtype=bool)
    for i in np.flatnonzero(ok):
        dominated = ok & (x <= x[i]) & (y >= y[i]) & ((x < x[i]) | (y > y[i]))
        front[i] = not dominated.any()
    return front


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _panels(frame: pd.DataFrame) -> list[tuple[tuple, pd.DataFrame]]:
    return list(frame.groupby(PANEL_KEYS, sort=True, dropna=False))


def _title(key: tuple) -> str:
    ds, data, model, hw = key
    return f"{ds}{f' ({data})' if data else ''} / {model}\n{hw}"


def label(r: Any, length: bool = False) -> str:
    """METHOD plus its own settings (rho, beta, ...), and the run length where a panel mixes them."""
    own = " ".join(f"{k}={v}" for k, v in parse_settings(r.hparams).items()
                   if k not in ("lr", "weight_decay") and not k.startswith("base.") and v not in ("False", "None"))
    text = f"{str(r.optimizer).upper()}{' ' + own if own else ''}"
    if length:
        text += f", budget {r.budget:g}" if not math.isnan(r.budget) else f", {r.epochs:g} ep"
    return text


def _mixes_length(part: pd.DataFrame) -> bool:
    return part[["epochs", "budget"]].drop_duplicates().shape[0] > 1


def plot_acc_vs_throughput(table: pd.DataFrame, path: Path) -> Path:
    """Best test accuracy against images/s, error bars = std over seeds."""
    plt = _pyplot()
    panels = _panels(table)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    for ax, (key, part) in zip(axes[0], panels):
        for _, r in part.iterrows():
            ax.errorbar(r.img_per_s_mean, r.acc_best_mean, xerr=_nan0(r.img_per_s_std), yerr=_nan0(r.acc_best_std),
                        fmt="o", capsize=3, label=f"{label(r, _mixes_length(part))} (n={int(r.n)})")
        _finish_panel(ax, _title(key), "training images/s (higher is cheaper)", "test accuracy %, best epoch")
    return _save(fig, plt, path)


def plot_curves(curves: pd.DataFrame, path: Path) -> Path | None:
    """Test accuracy per epoch, mean over seeds with a ±std band, one line per cell."""
    if curves.empty:
        return None
    plt = _pyplot()
    panels = _panels(curves)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    keys = [k for k in CELL_KEYS if k not in PANEL_KEYS]
    for ax, (key, part) in zip(axes[0], panels):
        for cell, g in part.groupby(keys, dropna=False, sort=False):
            stats = g.groupby("epoch").test_acc.agg(["mean", "std"]).reset_index()
            r = pd.Series(dict(zip(keys, cell)))
            line, = ax.plot(stats.epoch, stats["mean"], label=f"{label(r, _mixes_length(part))} (n={g.source.nunique()})")
            ax.fill_between(stats.epoch, stats["mean"] - stats["std"].fillna(0), stats["mean"] + stats["std"].fillna(0),
                            color=line.get_color(), alpha=0.2)
        _finish_panel(ax, _title(key), "epoch", "test accuracy %")
    return _save(fig, plt, path)


def plot_pareto(table: pd.DataFrame, path: Path) -> Path | None:
    """Final test accuracy (mean ± std over seeds) against compute used (SGD-epochs, top row) and
    wall time (bottom row), one point per cell; the Pareto front (nothing cheaper is as accurate)
    is joined and ringed. None when no cell recorded its compute (runs from before it was logged)."""
    table = table[table.compute_used_mean.notna() | table.wall_time_s_mean.notna()]
    if table.empty:
        return None
    plt = _pyplot()
    panels = _panels(table)
    fig, axes = plt.subplots(2, len(panels), figsize=(4.8 * len(panels), 7.4), squeeze=False)
    axis = (("compute_used", "compute used (SGD-epoch equivalents)"), ("wall_time_s", "training wall time, s"))
    for col, (key, part) in enumerate(panels):
        methods = sorted(part.optimizer.unique(), key=str)
        colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
        for row, (x, xlabel) in enumerate(axis):
            ax = axes[row][col]
            xs, ys = part[f"{x}_mean"].to_numpy(float), part.acc_final_mean.to_numpy(float)
            for method in methods:
                m = part[part.optimizer == method]
                ax.errorbar(m[f"{x}_mean"], m.acc_final_mean, xerr=m[f"{x}_std"].fillna(0),
                            yerr=m.acc_final_std.fillna(0), fmt="o", capsize=3, color=colors[method],
                            label=str(method).upper())
            front = pareto_front(xs, ys)
            if front.any():
                order = np.argsort(xs[front])
                ax.step(xs[front][order], ys[front][order], where="post", color="k", lw=1, alpha=0.6,
                        label="Pareto front")
                ax.scatter(xs[front], ys[front], s=160, facecolors="none", edgecolors="k", zorder=3)
            _finish_panel(ax, _title(key), xlabel, "test accuracy %, final (mean ± std)")
    return _save(fig, plt, path)


def _finish_panel(ax, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _save(fig, plt, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _nan0(v: float) -> float:
    return 0.0 if v is None or math.isnan(v) else v
