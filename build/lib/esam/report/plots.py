"""The report's figures: accuracy vs throughput, accuracy per epoch, and accuracy vs compute
(Pareto). One panel per task (dataset and its settings, model, hardware label)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from esam.report.runs import CELL_KEYS
from esam.report.tables import headline, shown_settings

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


def _panels(frame: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """(title, rows) per task: dataset with the settings that tell its panels apart, model, hardware."""
    out = []
    for (ds, data, model, hw), part in frame.groupby(PANEL_KEYS, sort=True, dropna=False):
        same = sorted(set(frame.data[frame.dataset == ds]))
        shown = dict(zip(same, shown_settings(same))).get(data, "")
        out.append((f"{ds}{f' ({shown})' if shown else ''} / {model}\n{hw}", part))
    return out


def labels(part: pd.DataFrame) -> list[str]:
    """Per row: METHOD plus the settings that tell the panel's rows apart (and rho, beta, gamma),
    and the run length where the panel mixes lengths."""
    shown = shown_settings(list(part.hparams), always=headline)
    mixed = part[["epochs", "budget"]].drop_duplicates().shape[0] > 1
    out = []
    for (_, r), settings in zip(part.iterrows(), shown):
        text = f"{str(r.optimizer).upper()}{' ' + settings if settings else ''}"
        if mixed:
            text += f", budget {r.budget:g}" if not math.isnan(r.budget) else f", {r.epochs:g} ep"
        out.append(text)
    return out


def plot_acc_vs_throughput(table: pd.DataFrame, path: Path) -> Path:
    """Best test accuracy against images/s, error bars = std over seeds."""
    plt = _pyplot()
    panels = _panels(table)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    for ax, (title, part) in zip(axes[0], panels):
        for (_, r), text in zip(part.iterrows(), labels(part)):
            ax.errorbar(r.img_per_s_mean, r.acc_best_mean, xerr=_nan0(r.img_per_s_std), yerr=_nan0(r.acc_best_std),
                        fmt="o", capsize=3, label=f"{text} (n={int(r.n)})")
        _finish_panel(ax, title, "training images/s (higher is cheaper)", "test accuracy %, best epoch")
    return _save(fig, plt, path)


def plot_curves(curves: pd.DataFrame, path: Path) -> Path | None:
    """Test accuracy per epoch, mean over seeds with a ±std band, one line per cell."""
    if curves.empty:
        return None
    plt = _pyplot()
    panels = _panels(curves)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    keys = [k for k in CELL_KEYS if k not in PANEL_KEYS]
    for ax, (title, part) in zip(axes[0], panels):
        cells = list(part.groupby(keys, dropna=False, sort=False))
        names = labels(pd.DataFrame([dict(zip(keys, cell)) for cell, _ in cells]))
        for (cell, g), name in zip(cells, names):
            stats = g.groupby("epoch").test_acc.agg(["mean", "std"]).reset_index()
            line, = ax.plot(stats.epoch, stats["mean"], label=f"{name} (n={g.source.nunique()})")
            ax.fill_between(stats.epoch, stats["mean"] - stats["std"].fillna(0), stats["mean"] + stats["std"].fillna(0),
                            color=line.get_color(), alpha=0.2)
        _finish_panel(ax, title, "epoch", "test accuracy %")
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
    for col, (title, part) in enumerate(panels):
        methods = sorted(part.optimizer.unique(), key=str)
        colors = {m: plt.cm.tab20(i % 20) for i, m in enumerate(methods)}  # up to 20 methods apart
        markers = {m: "osD^v<>ph*"[i % 10] for i, m in enumerate(methods)}
        for row, (x, xlabel) in enumerate(axis):
            ax = axes[row][col]
            xs, ys = part[f"{x}_mean"].to_numpy(float), part.acc_final_mean.to_numpy(float)
            for method in methods:
                m = part[part.optimizer == method]
                ax.errorbar(m[f"{x}_mean"], m.acc_final_mean, xerr=m[f"{x}_std"].fillna(0),
                            yerr=m.acc_final_std.fillna(0), fmt=markers[method], capsize=3, color=colors[method],
                            label=str(method).upper())
            front = pareto_front(xs, ys)
            if front.any():
                order = np.argsort(xs[front])
                ax.step(xs[front][order], ys[front][order], where="post", color="k", lw=1, alpha=0.6,
                        label="Pareto front")
                ax.scatter(xs[front], ys[front], s=160, facecolors="none", edgecolors="k", zorder=3)
            _finish_panel(ax, title, xlabel, "test accuracy %, final (mean ± std)")
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
