"""Run folders -> one row per run, and which runs a table counts.

A *cell* is one configuration: experiment, dataset (and its settings), model, hardware (device
model, ranks, precision, threads), optimizer label and its hyper-parameters, batch size, and
epochs or compute budget. Runs in a cell differ only in the seed; a seed seen twice in a cell
(a rerun, a demo run that repeats a sweep's seed-0 run) is counted once, the newest.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from esam.errors import UserError

# One configuration = one cell of a table; the seed is what varies inside it.
CELL_KEYS = ["experiment", "dataset", "data", "model", "hardware", "optimizer", "hparams", "batch_size",
             "epochs", "budget"]
RUN_COLUMNS = CELL_KEYS + ["method", "seed", "test_acc_best", "test_acc_final", "img_per_s", "compute_used",
                           "wall_time_s", "epochs_run", "rho", "beta", "gamma", "finished", "source"]
NUMERIC = ["test_acc_best", "test_acc_final", "img_per_s", "compute_used", "wall_time_s", "epochs_run",
           "rho", "beta", "gamma", "epochs", "budget", "batch_size", "finished"]
# Dataset settings that do not change what is learned (where the files are, how they are read).
DATA_IGNORED = ("name", "root", "download", "num_workers", "batch_size", "test_batch_size")


def find_summaries(paths: Iterable[str | Path]) -> list[Path]:
    """Every summary.json at or below ``paths`` (run folders, multirun folders, or the files)."""
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise UserError(f"{p} does not exist (give run folders, multirun folders or summary.json files)")
        found += [p] if p.is_file() else sorted(p.rglob("summary.json"))
    return sorted(set(found))


def hardware_label(s: dict[str, Any]) -> str:
    """What throughput depends on besides the model: device model (runtime.device_name), ranks,
    precision, CPU threads. Old summaries that say ``x86_64`` keep that as their own label."""
    name = s.get("device_name") or s.get("device") or "?"
    parts = [str(name) + (f" x{s['world_size']}" if (s.get("world_size") or 1) > 1 else "")]
    if s.get("precision"):
        parts.append(str(s["precision"]))
    if s.get("device") == "cpu" and s.get("num_threads"):
        parts.append(f"{s['num_threads']} thr")
    return ", ".join(parts)


def settings(d: dict[str, Any] | None, drop: Iterable[str] = ()) -> str:
    """A nested config dict as one canonical string, ``a=1 b.c=x`` (sorted, dotted, no spaces in
    values), so equal settings compare equal and a table can show the keys that differ."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, v: Any) -> None:
        if isinstance(v, dict):
            for k, sub in v.items():
                walk(f"{prefix}.{k}" if prefix else str(k), sub)
        else:
            flat[prefix] = v

    walk("", {k: v for k, v in (d or {}).items() if k not in set(drop)})
    return " ".join(f"{k}={_fmt(v)}" for k, v in sorted(flat.items()))


def parse_settings(text: Any) -> dict[str, str]:
    """The inverse of :func:`settings` (values stay strings)."""
    if not isinstance(text, str) or not text:
        return {}
    return dict(item.partition("=")[::2] for item in text.split(" "))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v, separators=(",", ":"), default=str)
    return str(v).replace(" ", "_")


def _num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def run_row(s: dict[str, Any], source: str, finished: float | None = None) -> dict[str, Any]:
    """One run's summary (summary.json fields, with its resolved ``config``) -> one row of runs.csv.
    ``finished``: when it ended (seconds since the epoch), to keep the newest of a repeated seed."""
    config = s.get("config") if isinstance(s.get("config"), dict) else {}
    opt = config.get("optimizer") if isinstance(config.get("optimizer"), dict) else None
    data = config.get("dataset") if isinstance(config.get("dataset"), dict) else None
    trainer = config.get("trainer") if isinstance(config.get("trainer"), dict) else {}
    # Older summaries have no config: their hyper-parameters are the three the table always had.
    hparams = settings(opt, drop=("name", "label")) if opt is not None else settings(
        {k: s.get(k) for k in ("rho", "beta", "gamma") if s.get(k) is not None})
    budget = _num(s["budget"] if s.get("budget") is not None else trainer.get("budget"))
    epochs = _num(trainer.get("epochs", s.get("epochs")))
    return {
        "experiment": s.get("experiment"), "dataset": s.get("dataset"),
        "data": settings(data, drop=DATA_IGNORED) if data is not None else "",
        "model": s.get("model"), "hardware": hardware_label(s), "optimizer": s.get("optimizer"),
        "hparams": hparams, "batch_size": _num(s.get("batch_size")),
        # A budget run's length is its budget; its epoch count is whatever the budget bought.
        "epochs": math.nan if not math.isnan(budget) else epochs, "budget": budget,
        "method": s.get("method") or s.get("optimizer"), "seed": s.get("seed"),
        "test_acc_best": _num(s.get("test_acc_best")), "test_acc_final": _num(s.get("test_acc_final")),
        "img_per_s": _num(s.get("img_per_s")), "compute_used": _num(s.get("compute_used")),
        "wall_time_s": _num(s.get("wall_time_s")),
        "epochs_run": _num(s.get("epochs_done", s.get("epochs"))),
        "rho": _num(s.get("rho")), "beta": _num(s.get("beta")), "gamma": _num(s.get("gamma")),
        "finished": _num(finished), "source": source,
    }


def runs_frame(rows: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """A DataFrame of runs with the columns the tables need, from run_row dicts or raw summaries."""
    rows = [r if "hardware" in r else run_row(r, str(r.get("run_dir", ""))) for r in rows]
    df = pd.DataFrame(rows, columns=RUN_COLUMNS)
    for k in NUMERIC:
        df[k] = pd.to_numeric(df[k], errors="coerce").astype(float)
    for k in ("experiment", "dataset", "data", "model", "hardware", "optimizer", "hparams", "method", "source"):
        df[k] = df[k].astype(object).where(df[k].notna(), "")
    return df


def load_runs(paths: Iterable[str | Path]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(runs, curves) from run folders: one row per run, one row per run and epoch."""
    paths = list(paths)
    summaries = find_summaries(paths)
    if not summaries:
        raise UserError(f"no summary.json below {' '.join(map(str, paths))} (a run writes it when it completes)")
    rows, curves = [], []
    for path in summaries:
        try:
            s = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{path} is not readable JSON ({e})") from None
        finished = s.get("finished_at") if isinstance(s.get("finished_at"), (int, float)) else path.stat().st_mtime
        row = run_row(s, str(path.parent), finished)
        rows.append(row)
        metrics = path.parent / "metrics.jsonl"
        if metrics.is_file():
            curves += [curve_point(row, json.loads(line)) for line in metrics.read_text().splitlines() if line.strip()]
    return runs_frame(rows), curves_frame(curves)


def curve_point(row: dict[str, Any], r: dict[str, Any]) -> dict[str, Any]:
    """One metrics.jsonl record of a run -> one row of the curves frame."""
    return {**{k: row[k] for k in CELL_KEYS + ["method", "seed", "source"]}, "epoch": r["epoch"],
            "test_acc": r.get("test_acc"), "train_loss": r.get("train_loss"),
            "compute_used": r.get("compute_used"), "wall_time_s": r.get("wall_time_s")}


def curves_frame(points: list[dict[str, Any]]) -> pd.DataFrame:
    df = pd.DataFrame(points, columns=CELL_KEYS + ["method", "seed", "source", "epoch", "test_acc", "train_loss",
                                                   "compute_used", "wall_time_s"])
    for k in ("test_acc", "train_loss", "compute_used", "wall_time_s", "epochs", "budget", "batch_size"):
        df[k] = pd.to_numeric(df[k], errors="coerce").astype(float)
    return df


def cell_name(r: Any) -> str:
    """A cell in words, for warnings."""
    length = f"budget {r['budget']:g}" if not math.isnan(r["budget"]) else f"{r['epochs']:g} epochs"
    parts = [r["experiment"], r["dataset"], r["data"], r["model"], r["hardware"], r["optimizer"], r["hparams"],
             f"batch {r['batch_size']:g}", length]
    return "(" + ", ".join(str(p) for p in parts if p != "") + ")"


def select_runs(runs: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """``runs`` with ``used`` (counted by the tables) and ``left_out`` (why not): in each cell, a seed
    that appears in several runs counts once, the newest (by ``finished``). Returns the warnings."""
    runs = runs.copy()
    runs["used"] = True
    runs["left_out"] = ""
    warnings: list[str] = []
    if runs.empty:
        return runs, warnings
    newest_first = runs.assign(_t=runs.finished.fillna(-math.inf)).sort_values("_t", ascending=False, kind="stable")
    for _, g in newest_first[newest_first.seed.notna()].groupby(CELL_KEYS + ["seed"], dropna=False, sort=False):
        if len(g) < 2:
            continue
        keep, drop = g.index[0], list(g.index[1:])
        runs.loc[drop, "used"] = False
        runs.loc[drop, "left_out"] = f"seed repeated in its cell; counted: {runs.source[keep]}"
        first = runs.loc[keep]
        warnings.append(f"warning: seed {first.seed} appears in {len(g)} runs of the cell {cell_name(first)}; "
                        f"counting only the newest ({first.source}), leaving out "
                        + ", ".join(str(runs.source[i]) for i in drop))
    return runs, warnings
