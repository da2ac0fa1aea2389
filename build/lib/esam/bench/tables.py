"""The bench's tables: one row per method (time, FLOPs, cost model), phases, the grid's planes.

Step time is summarised by the median over the quiet blocks (robust to bursts of load), except
for a method whose window mixes steps of different passes (a cheap step most of the time, a
full one now and then): there no single step is typical and the mean is reported, like the
cost model's expectation. The ``stat`` column says which.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from esam.bench.measure import Bench, Method
from esam.config import BenchMode

SEGMENT_ORDER = ["setup", "first_pass.fwd", "first_pass.bwd", "perturb", "select_forward.fwd",
                 "select_forward.topk", "second_pass.fwd", "second_pass.bwd", "restore", "base_update"]


def _median(xs: list[float]) -> float:
    return float(np.median(xs)) if xs else math.nan


def _quantile(xs: list[float], q: float) -> float:
    return float(np.quantile(xs, q)) if xs else math.nan


def _center(m: Method):
    return (lambda xs: float(np.mean(xs))) if m.mixed_steps else _median


def clean_blocks(bench: Bench, m: Method) -> list[int]:
    """Repeats whose block ran while other processes were quiet (all of them if none was)."""
    quiet = [r for r, share in enumerate(m.foreign) if not bench.busy(share)]
    return quiet or list(range(len(m.times)))


def segments(bench: Bench) -> list[str]:
    seen = {k for m in bench.methods for k in m.phase_ms}
    return [s for s in SEGMENT_ORDER if s in seen] + sorted(seen - set(SEGMENT_ORDER))


def bench_rows(bench: Bench, env: dict[str, Any]) -> pd.DataFrame:
    """One row per method: times, throughput, extra % (measured, FLOP-counted, cost model), phases."""
    base = next(m for m in bench.methods if m.name == bench.cfg.baseline)
    clean = {m.name: clean_blocks(bench, m) for m in bench.methods}
    base_flops = base.flops.get("total", math.nan)
    base_cost = float(np.mean(base.costs)) if base.costs else math.nan
    rows = []
    for m in bench.methods:
        center = _center(m)
        all_t = [t for r in clean[m.name] for t in m.times[r]]
        base_t = [t for r in clean[base.name] for t in base.times[r]]
        both = [r for r in clean[m.name] if r in set(clean[base.name])]
        # Paired: each repeat's block against the baseline's block of the same repeat.
        per_repeat = [100 * (center(m.times[r]) / center(base.times[r]) - 1) for r in both] or [math.nan]
        fwd = sum(v for k, v in m.flops.items() if k.endswith(".fwd"))
        bwd = sum(v for k, v in m.flops.items() if k.endswith(".bwd"))
        measured_cost = float(np.mean(m.costs)) if m.costs else math.nan
        rows.append({
            "method": m.name,
            "optimizer": m.spec.method,
            "hparams": " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                                for k, v in m.spec.hparams.items()),
            "beta": m.spec.hparam("beta"),
            "gamma": m.spec.hparam("gamma"),
            "stat": "mean" if m.mixed_steps else "median",
            "ms_step": 1e3 * center(all_t),
            "ms_median": 1e3 * _median(all_t),
            "ms_mean": 1e3 * float(np.mean(all_t)),
            "ms_q25": 1e3 * _quantile(all_t, 0.25),
            "ms_q75": 1e3 * _quantile(all_t, 0.75),
            "ms_min": 1e3 * min(all_t),
            "ms_max": 1e3 * max(all_t),
            "images_per_s": bench.batch_size / center(all_t),
            "extra_pct": 100 * (center(all_t) / center(base_t) - 1),
            "extra_pct_paired_median": _median(per_repeat),
            "extra_pct_paired_q25": _quantile(per_repeat, 0.25),
            "extra_pct_paired_q75": _quantile(per_repeat, 0.75),
            "blocks_used": len(clean[m.name]),
            "blocks": len(m.times),
            "gflops_step": m.flops.get("total", math.nan) / 1e9,
            "gflops_fwd": fwd / 1e9,
            "gflops_bwd": bwd / 1e9,
            "extra_flops_pct": 100 * (m.flops.get("total", math.nan) / base_flops - 1),
            "cost_units": m.units,                       # the registry's expected cost
            "cost_measured": measured_cost,              # mean opt.last_cost over the timed steps
            "cost_model_extra_pct": 100 * (m.units / base.units - 1),
            "cost_measured_extra_pct": 100 * (measured_cost / base_cost - 1),
            **{f"phase_ms.{k}": m.phase_ms.get(k, 0.0) for k in segments(bench) if m.phase_ms},
            "model": bench.cfg.model.label,
            "device": env["device"],
            "precision": bench.precision,
            "channels_last": bench.channels_last,
            "batch_size": bench.batch_size,
            "input_shape": "x".join(map(str, bench.input_shape)),
            "steps": bench.cfg.steps,
            "repeats": bench.cfg.repeats,
            "window": f"{bench.cfg.window.start:g}-{bench.cfg.window.end:g}",
            "torch": env["torch"],
        })
    return pd.DataFrame(rows)


def grid_table(df: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """The grid's points (every row but the baseline), sorted by beta then gamma."""
    g = df[df.method != baseline][["beta", "gamma", "ms_step", "extra_pct", "extra_flops_pct",
                                   "cost_model_extra_pct", "extra_pct_paired_q25", "extra_pct_paired_q75"]]
    return g.sort_values(["beta", "gamma"]).reset_index(drop=True)


def report_tables(df: pd.DataFrame, bench: Bench) -> list[tuple[str, pd.DataFrame]]:
    """(caption, DataFrame) pairs: the main table, then the phases or the grid's planes."""
    cfg = bench.cfg
    cols = {"method": "method", "stat": "stat", "ms_step": "ms/step", "ms_q25": "q25", "ms_q75": "q75",
            "images_per_s": "img/s", "extra_pct": "extra %", "extra_pct_paired_median": "paired %",
            "extra_flops_pct": "FLOPs extra %", "cost_model_extra_pct": "cost model %",
            "cost_measured_extra_pct": "cost run %", "gflops_step": "GFLOP/step"}
    table = df[list(cols)].rename(columns=cols)
    table["blocks"] = [f"{u}/{n}" for u, n in zip(df.blocks_used, df.blocks)]
    out = [(f"ms/step over the quiet blocks of {cfg.repeats} x {cfg.steps} steps spread over training "
            f"progress {cfg.window.start:g}-{cfg.window.end:g} (stat: median, or mean where a method mixes "
            f"cheap and full steps; q25, q75); extra % vs {cfg.baseline}, paired % = median over repeats of "
            "each block vs the baseline's block; cost model % = the registry's expected cost, cost run % = "
            "the mean cost the steps reported (opt.last_cost)", table)]
    segs = segments(bench)
    if segs:
        ph = df[["method"] + [f"phase_ms.{s}" for s in segs]].copy()
        ph.columns = ["method"] + segs
        ph["sum"] = ph[segs].sum(axis=1)
        out.append((f"per-phase ms/step (median of {cfg.phase_steps} steps, synced at each phase "
                    f"boundary; other processes used {bench.phase_foreign_cpu:.0%} of the CPU meanwhile)", ph))
    if BenchMode(cfg.mode) == BenchMode.grid:
        grid = grid_table(df, cfg.baseline)
        for col, label in (("extra_pct", "measured"), ("extra_flops_pct", "FLOP-counted"),
                           ("cost_model_extra_pct", "cost-model")):
            plane = grid.pivot(index="beta", columns="gamma", values=col)
            plane.columns = [f"gamma={g:g}" for g in plane.columns]
            out.append((f"{label} extra % of {cfg.grid.method} vs {cfg.baseline} (rows: beta)", plane.reset_index()))
    return out


def format_tables(tables: list[tuple[str, pd.DataFrame]]) -> str:
    """Plain text for the console."""
    return "\n\n".join(f"{caption}:\n{t.to_string(index=False, float_format=lambda v: f'{v:.1f}')}"
                       for caption, t in tables)


def markdown(t: pd.DataFrame) -> str:
    """A DataFrame as a GitHub table, numbers right-aligned with one decimal."""
    def cell(v: Any) -> str:
        return f"{v:.1f}" if isinstance(v, float) else str(v)

    numeric = [t[c].dtype.kind in "if" for c in t.columns]
    lines = ["| " + " | ".join(map(str, t.columns)) + " |",
             "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in t.itertuples(index=False)]
    return "\n".join(lines)


def markdown_report(tables: list[tuple[str, pd.DataFrame]], env: dict[str, Any], title: str) -> str:
    commit = env["git_commit"]
    dirty = commit.endswith("-dirty")
    head = [f"### {title}", "", f"`{env['command']}`", "",
            f"commit {commit.removesuffix('-dirty')[:10]}{' (dirty)' if dirty else ''}, {env['threads']} threads, "
            f"{env['num_params']:,} parameters", ""]
    return "\n".join(head + [f"{caption}:\n\n{markdown(t)}\n" for caption, t in tables])
