"""The bench's figures: extra time per method (bars), or the grid's beta x gamma heat maps."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def plot_bars(df: pd.DataFrame, baseline: str, title: str, path: Path) -> None:
    """Measured, FLOP-counted and cost-model extra % of each method over the baseline."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = df[df.method != baseline].reset_index(drop=True)
    x = np.arange(len(d))
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(d), 4))
    # Whiskers: the IQR of the per-repeat (paired) extra %.
    err = np.clip(np.array([d.extra_pct - d.extra_pct_paired_q25, d.extra_pct_paired_q75 - d.extra_pct]), 0, None)
    bars = [("measured (stat column; IQR over repeats)", d.extra_pct, err), ("FLOP-counted", d.extra_flops_pct, None),
            ("cost model", d.cost_model_extra_pct, None)]
    for i, (label, vals, e) in enumerate(bars):
        rects = ax.bar(x + (i - 1) * 0.27, vals, 0.27, label=label, yerr=e, capsize=3 if e is not None else 0)
        ax.bar_label(rects, fmt="%.0f", fontsize=7, padding=2)
    ax.axhline(100, color="grey", lw=0.6, ls=":")
    ax.axhline(40, color="grey", lw=0.6, ls="--")
    ax.set_xticks(x, d.method)
    ax.set_ylabel(f"extra time vs {baseline} (%)")
    ax.set_ylim(0, 1.3 * max(105.0, float(np.nanmax(d[["extra_pct", "extra_flops_pct"]].values))))
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="upper center", ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_grid(grid: pd.DataFrame, title: str, path: Path) -> None:
    """Three heat maps (measured, FLOP-counted, cost model) over beta x gamma."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("extra_pct", "measured extra %"), ("extra_flops_pct", "FLOP-counted extra %"),
              ("cost_model_extra_pct", "cost-model extra %")]
    vmax = max(100.0, float(grid[[p for p, _ in panels]].max().max()))
    fig, axes = plt.subplots(1, 3, figsize=(13, 4), sharey=True)
    for ax, (col, label) in zip(axes, panels):
        z = grid.pivot(index="beta", columns="gamma", values=col)
        im = ax.imshow(z.values, origin="lower", cmap="viridis", vmin=0, vmax=vmax, aspect="auto")
        ax.set_xticks(range(z.shape[1]), [f"{g:g}" for g in z.columns])
        ax.set_yticks(range(z.shape[0]), [f"{b:g}" for b in z.index])
        for i in range(z.shape[0]):
            for j in range(z.shape[1]):
                v = z.values[i, j]
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=8,
                        color="white" if v < 0.6 * vmax else "black",
                        fontweight="bold" if v <= 40 else "normal")
        ax.set_xlabel("gamma (SDS sample fraction)")
        ax.set_title(label, fontsize=9)
    axes[0].set_ylabel("beta (SWP tensor probability)")
    fig.colorbar(im, ax=axes, shrink=0.8, label="extra vs SGD (%); bold: <= 40")
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
