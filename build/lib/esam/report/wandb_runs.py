"""wandb runs (public API, logged by esam.loggers) -> the same rows as run folders give."""
from __future__ import annotations

import math
from typing import Any

import pandas as pd

from esam.errors import UserError
from esam.loggers import summary_key, wandb_key
from esam.report.runs import curve_point, curves_frame, run_row, runs_frame
from esam.report.tables import extra_vs_sgd_per_run


def _unwrap(v: Any) -> Any:
    """The raw API form {"value": ...} -> the value, at every level."""
    if isinstance(v, dict):
        if set(v) == {"value"}:
            return _unwrap(v["value"])
        return {k: _unwrap(x) for k, x in v.items()}
    return v


def _dig(config: dict[str, Any], dotted: str) -> Any:
    """config['a']['b'] or config['a.b'] (wandb keeps nested dicts; some exports flatten them)."""
    if dotted in config:
        return config[dotted]
    d: Any = config
    for k in dotted.split("."):
        d = d.get(k) if isinstance(d, dict) else None
    return d


def row_from_wandb(run: Any) -> dict[str, Any] | None:
    """A wandb public-API run -> the row its summary.json gives. None for runs that are not
    finished training runs of this benchmark."""
    summary = dict(run.summary) if run.summary is not None else {}
    config = _unwrap(dict(run.config or {}))
    s: dict[str, Any] = {"config": config}
    for key, value in summary.items():
        s[summary_key(key)] = value
    for key, dotted in (("dataset", "dataset.name"), ("model", "model.label"), ("optimizer", "optimizer.label"),
                        ("method", "optimizer.name"), ("seed", "seed"), ("batch_size", "dataset.batch_size"),
                        ("rho", "optimizer.rho"), ("beta", "optimizer.beta"), ("gamma", "optimizer.gamma"),
                        ("experiment", "experiment_name"), ("budget", "trainer.budget")):
        if s.get(key) is None:
            s[key] = _dig(config, dotted)
    for key, dotted in (("model", "model.name"), ("optimizer", "optimizer.name")):  # runs before labels
        if s.get(key) is None:
            s[key] = _dig(config, dotted)
    if s.get("epochs") is None:
        s["epochs"] = _dig(config, "trainer.epochs")
    if not all(s.get(k) is not None for k in ("dataset", "model", "optimizer", "test_acc_best")):
        return None
    return run_row(s, wandb_source(run), finished=summary.get("_timestamp"))


def curves_from_wandb(run: Any, row: dict[str, Any]) -> list[dict[str, Any]]:
    keys = {wandb_key(k): k for k in ("epoch", "test_acc", "train_loss", "compute_used", "wall_time_s")}
    hist = run.history(keys=list(keys), pandas=False)
    return [curve_point(row, {ours: h.get(theirs) for theirs, ours in keys.items()}) for h in hist if "epoch" in h]


def load_wandb(project: str, group: str | None = None, api: Any = None) -> tuple[pd.DataFrame, pd.DataFrame, list]:
    """(runs, curves, wandb runs) of ENTITY/PROJECT's finished training runs (optionally one group)."""
    if api is None:
        import wandb

        api = wandb.Api()
    filters: dict[str, Any] = {"state": "finished", "jobType": "train"}
    if group:
        filters["group"] = group
    rows, curves, kept = [], [], []
    for run in api.runs(project, filters=filters):
        row = row_from_wandb(run)
        if row is None:
            continue
        rows.append(row)
        kept.append(run)
        curves += curves_from_wandb(run, row)
    if not rows:
        raise UserError(f"no finished esam training runs in wandb project {project}"
                        + (f" group {group}" if group else ""))
    return runs_frame(rows), curves_frame(curves), kept


def wandb_source(run: Any) -> str:
    return "wandb:" + "/".join(getattr(run, "path", None) or [str(getattr(run, "id", "?"))])


def push_extra_vs_sgd(wandb_runs: list, runs: pd.DataFrame) -> int:
    """Write perf/extra_vs_sgd_pct (measured time per image vs SGD's, in %) into each wandb run whose
    row in ``runs`` has an SGD baseline (local or wandb); returns how many runs were updated."""
    by_source = dict(zip(runs.source, extra_vs_sgd_per_run(runs)))
    n = 0
    for run in wandb_runs:
        value = by_source.get(wandb_source(run), math.nan)
        if not math.isnan(value):
            run.summary.update({"perf/extra_vs_sgd_pct": float(value)})
            n += 1
    return n
