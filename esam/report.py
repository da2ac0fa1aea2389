"""Run folders (or wandb runs) -> the paper-style table: test accuracy as mean ± std over seeds,
training throughput, and compute relative to SGD, with the paper's own numbers beside ours.

    python -m esam.report multirun/digits --out results/digits
    python -m esam.report outputs multirun --out results/table          (make table)
    python -m esam.report --wandb ENTITY/PROJECT [--group NAME] [--push] --out results/wandb

Every ``summary.json`` below the given folders is one run; ``metrics.jsonl`` beside it gives the
curves. Runs form one row when they differ only in the seed: same dataset, model, hardware,
method, rho/beta/gamma, batch size and epochs. Written to ``--out``: table.md, table.csv (all
numeric columns), runs.csv (one line per run), acc_vs_throughput.png and curves.png.

Definitions (also printed under the table):
- test acc: top-1 % on the test set at the best epoch ("best") and the last one ("final");
  ± is the sample standard deviation over seeds (ddof=1), absent for one seed.
- img/s: training images per second inside ``optimizer.step`` (the trainer's step timer, warm-up
  steps excluded), averaged over epochs, then over seeds.
- compute vs SGD: mean time per image / the mean time per image of the SGD runs on the same
  dataset, model, hardware and batch size, in % (SGD = 100; SAM ~200 in theory; the paper's
  claim for ESAM is ~140). ``perf/extra_vs_sgd_pct`` in wandb is this minus 100, per run.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from esam.errors import UserError

# Runs in one row share these (the seed is what varies).
GROUP_KEYS = ["dataset", "model", "hardware", "optimizer", "rho", "beta", "gamma", "batch_size", "epochs"]
# An SGD baseline for a row shares these with it.
SGD_KEYS = ["dataset", "model", "hardware", "batch_size"]
METHOD_ORDER = {"sgd": 0, "sam": 1, "esam": 2}
RUN_COLUMNS = ["dataset", "model", "optimizer", "seed", "test_acc_best", "test_acc_final", "img_per_s",
               "rho", "beta", "gamma", "batch_size", "epochs", "hardware", "experiment", "source"]


# -- the paper's numbers ----------------------------------------------------------------------
@dataclass(frozen=True)
class PaperNumber:
    """One cell of the paper, as printed there (their GPUs, their seeds)."""

    acc: float | None = None          # test accuracy %, mean over their runs
    img_per_s: float | None = None    # training images/s on the authors' GPUs
    compute_pct: float | None = None  # their throughput relative to SGD, %
    source: str = "Du et al. 2022, Table 1"


PAPER_CITATION = ("Du, Yan, Feng, Zhou, Zhen, Goh, Tan. Efficient Sharpness-aware Minimization for "
                  "Improved Training of Neural Networks. ICLR 2022, arXiv:2110.03141")

# Only numbers checked against the paper's text belong here. The one we could check is the
# abstract's claim: SAM needs 100% extra compute over the base optimizer, ESAM 40%. The per-table
# accuracies and images/s of Tables 1-2 were not available to check; add them the same way
# (with source="Du et al. 2022, Table N") once read off the paper.
_ABSTRACT = "Du et al. 2022, abstract (overall claim: SAM +100%, ESAM +40% compute over SGD)"
PAPER: dict[tuple[str, str, str], PaperNumber] = {
    (dataset, model, method): PaperNumber(compute_pct=pct, source=_ABSTRACT)
    for dataset in ("cifar10", "cifar100")
    for model in ("resnet18", "wrn28_10", "pyramidnet110")
    for method, pct in (("sgd", 100.0), ("sam", 200.0), ("esam", 140.0))
}


# -- reading runs ---------------------------------------------------------------------------------
def find_summaries(paths: Iterable[str | Path]) -> list[Path]:
    """Every summary.json at or below ``paths`` (run folders, multirun folders, or the files)."""
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise UserError(f"{p} does not exist (give run folders, multirun folders or summary.json files)")
        found += [p] if p.is_file() else sorted(p.rglob("summary.json"))
    return sorted(set(found))


def hardware_label(s: dict[str, Any]) -> str:
    """What throughput depends on besides the model: device, ranks, precision (CPU: threads)."""
    name = s.get("device_name") or s.get("device") or "?"
    parts = [str(name) + (f" x{s['world_size']}" if (s.get("world_size") or 1) > 1 else "")]
    if s.get("precision"):
        parts.append(str(s["precision"]))
    if s.get("device") == "cpu" and s.get("num_threads"):
        parts.append(f"{s['num_threads']} thr")
    return ", ".join(parts)


def run_row(s: dict[str, Any], source: str) -> dict[str, Any]:
    """One run's summary (the trainer's summary.json fields) -> one row of runs.csv."""
    def num(key: str) -> float:
        v = s.get(key)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan

    return {
        "dataset": s.get("dataset"), "model": s.get("model"), "optimizer": s.get("optimizer"),
        "seed": s.get("seed"), "test_acc_best": num("test_acc_best"), "test_acc_final": num("test_acc_final"),
        "img_per_s": num("img_per_s"), "rho": num("rho"), "beta": num("beta"), "gamma": num("gamma"),
        "batch_size": s.get("batch_size"), "epochs": s.get("epochs"), "hardware": hardware_label(s),
        "experiment": s.get("experiment"), "source": source,
    }


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
        row = run_row(s, str(path.parent))
        rows.append(row)
        metrics = path.parent / "metrics.jsonl"
        if metrics.is_file():
            for line in metrics.read_text().splitlines():
                if line.strip():
                    r = json.loads(line)
                    curves.append({**{k: row[k] for k in GROUP_KEYS + ["seed", "source"]},
                                   "epoch": r["epoch"], "test_acc": r.get("test_acc"),
                                   "train_loss": r.get("train_loss")})
    return runs_frame(rows), pd.DataFrame(curves)


def runs_frame(rows: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """A DataFrame of runs with the columns the table needs, from run_row dicts or raw summaries."""
    rows = [r if "hardware" in r else run_row(r, str(r.get("run_dir", ""))) for r in rows]
    df = pd.DataFrame(rows, columns=RUN_COLUMNS)
    for k in ("rho", "beta", "gamma", "test_acc_best", "test_acc_final", "img_per_s"):
        df[k] = pd.to_numeric(df[k], errors="coerce")
    return df


# -- wandb ----------------------------------------------------------------------------------------
# wandb summary key -> our summary key (older runs logged some without a prefix).
WANDB_KEYS = {"test/acc_best": "test_acc_best", "test/acc_final": "test_acc_final",
              "perf/img_per_s": "img_per_s", "img_per_s": "img_per_s"}


def _dig(config: dict[str, Any], dotted: str) -> Any:
    """config['a']['b'] or config['a.b'] (wandb keeps nested dicts; some exports flatten them)."""
    def unwrap(v: Any) -> Any:  # the raw API form {"value": ...}
        return v["value"] if isinstance(v, dict) and set(v) == {"value"} else v

    if dotted in config:
        return unwrap(config[dotted])
    d: Any = config
    for k in dotted.split("."):
        d = unwrap(d.get(k)) if isinstance(d, dict) else None
    return d


def row_from_wandb(run: Any) -> dict[str, Any] | None:
    """A wandb public-API run (logged by esam.loggers) -> the same row as a summary.json gives.
    None for runs that are not finished training runs of this benchmark."""
    summary = dict(run.summary) if run.summary is not None else {}
    config = dict(run.config or {})
    s: dict[str, Any] = {}
    for key, value in summary.items():
        s[WANDB_KEYS.get(key, key)] = value
    for key, dotted in (("dataset", "dataset.name"), ("model", "model.label"), ("optimizer", "optimizer.label"),
                        ("seed", "seed"), ("batch_size", "dataset.batch_size"), ("rho", "optimizer.rho"),
                        ("beta", "optimizer.beta"), ("gamma", "optimizer.gamma"), ("experiment", "experiment_name")):
        if s.get(key) is None:
            s[key] = _dig(config, dotted)
    for key, dotted in (("model", "model.name"), ("optimizer", "optimizer.name")):  # runs before labels
        if s.get(key) is None:
            s[key] = _dig(config, dotted)
    if s.get("epochs") is None:
        s["epochs"] = _dig(config, "trainer.epochs")
    if not all(s.get(k) is not None for k in ("dataset", "model", "optimizer", "test_acc_best")):
        return None
    return run_row(s, wandb_source(run))


def curves_from_wandb(run: Any, row: dict[str, Any]) -> list[dict[str, Any]]:
    hist = run.history(keys=["epoch", "test/acc", "train/loss"], pandas=False)
    return [{**{k: row[k] for k in GROUP_KEYS + ["seed", "source"]}, "epoch": h["epoch"],
             "test_acc": h.get("test/acc"), "train_loss": h.get("train/loss")} for h in hist if "epoch" in h]


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
    return runs_frame(rows), pd.DataFrame(curves), kept


def wandb_source(run: Any) -> str:
    return "wandb:" + "/".join(getattr(run, "path", None) or [str(getattr(run, "id", "?"))])


def push_extra_vs_sgd(wandb_runs: list, runs: pd.DataFrame) -> int:
    """Write perf/extra_vs_sgd_pct into each wandb run whose row in ``runs`` has an SGD baseline
    (local or wandb); returns how many runs were updated."""
    extra = dict(zip(runs.source, extra_vs_sgd_per_run(runs)))
    n = 0
    for run in wandb_runs:
        value = extra.get(wandb_source(run), math.nan)
        if not math.isnan(value):
            run.summary.update({"perf/extra_vs_sgd_pct": float(value)})
            n += 1
    return n


# -- the table -----------------------------------------------------------------------------------
class SGDBaseline:
    """SGD's mean time per image for a row: from SGD runs with the same epochs if there are
    any, else from all SGD runs on the same dataset, model, hardware and batch size."""

    def __init__(self, runs: pd.DataFrame) -> None:
        sgd = runs[runs.optimizer == "sgd"]
        tpi = 1.0 / sgd.img_per_s
        self.exact = tpi.groupby([sgd[k] for k in SGD_KEYS + ["epochs"]], dropna=False).mean()
        self.loose = tpi.groupby([sgd[k] for k in SGD_KEYS], dropna=False).mean()

    def __call__(self, row: Any) -> float:
        key = tuple(row[k] for k in SGD_KEYS)
        if key + (row["epochs"],) in self.exact.index:
            return float(self.exact[key + (row["epochs"],)])
        return float(self.loose[key]) if key in self.loose.index else math.nan


def extra_vs_sgd_per_run(runs: pd.DataFrame) -> pd.Series:
    """Per run: 100 * (its time per image / SGD's mean time per image - 1); NaN without SGD runs."""
    base = SGDBaseline(runs)
    return pd.Series([100.0 * ((1.0 / r.img_per_s) / base(r) - 1.0) for _, r in runs.iterrows()],
                     index=runs.index, dtype=float)


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per group of seeds: n, accuracy mean/std, img/s, compute vs SGD, the paper's numbers."""
    if runs.empty:
        raise UserError("no runs to summarise")
    runs = runs.assign(time_per_img=1.0 / runs.img_per_s)
    g = runs.groupby(GROUP_KEYS, dropna=False, sort=False)
    table = g.agg(
        n=("test_acc_best", "size"),
        seeds=("seed", lambda s: ",".join(str(x) for x in sorted(s.dropna().unique()))),
        acc_best_mean=("test_acc_best", "mean"), acc_best_std=("test_acc_best", "std"),
        acc_final_mean=("test_acc_final", "mean"), acc_final_std=("test_acc_final", "std"),
        img_per_s_mean=("img_per_s", "mean"), img_per_s_std=("img_per_s", "std"),
        time_per_img=("time_per_img", "mean"),
    ).reset_index()
    base = SGDBaseline(runs)
    table["compute_vs_sgd_pct"] = [100.0 * r.time_per_img / base(r) for _, r in table.iterrows()]
    table["extra_vs_sgd_pct"] = table.compute_vs_sgd_pct - 100.0
    table["time_per_img_us"] = 1e6 * table.pop("time_per_img")
    for field in ("acc", "img_per_s", "compute_pct"):
        table[f"paper_{field}"] = [getattr(PAPER.get((r.dataset, r.model, r.optimizer)), field, None)
                                   for _, r in table.iterrows()]
    table["paper_source"] = [getattr(PAPER.get((r.dataset, r.model, r.optimizer)), "source", None)
                             for _, r in table.iterrows()]
    order = table.optimizer.map(lambda m: METHOD_ORDER.get(m, len(METHOD_ORDER)))
    table = (table.assign(_o=order)
             .sort_values(["dataset", "model", "hardware", "batch_size", "epochs", "_o", "optimizer",
                           "rho", "beta", "gamma"], kind="stable")
             .drop(columns="_o").reset_index(drop=True))
    return table


def _pm(mean: float, std: float, n: int, digits: int = 2) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    return f"{mean:.{digits}f}" if n < 2 or math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _num(v: Any, fmt: str = "{:g}") -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def markdown_table(table: pd.DataFrame) -> str:
    """The paper-style Markdown table (paper columns only where the paper has numbers)."""
    paper_cols = [c for c in ("acc", "img_per_s", "compute_pct") if table[f"paper_{c}"].notna().any()]
    head = ["dataset", "model", "hardware", "method", "ρ", "β", "γ", "batch", "epochs", "n",
            "test acc % (best)", "test acc % (final)", "img/s", "compute vs SGD"]
    head += [{"acc": "paper acc %", "img_per_s": "paper img/s", "compute_pct": "paper vs SGD"}[c] for c in paper_cols]
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join(["---"] * 4 + ["---:"] * (len(head) - 4)) + "|"]
    for _, r in table.iterrows():
        n = int(r.n)
        cells = [str(r.dataset), str(r.model), str(r.hardware), str(r.optimizer).upper(),
                 _num(r.rho), _num(r.beta), _num(r.gamma), _num(r.batch_size), _num(r.epochs), str(n),
                 _pm(r.acc_best_mean, r.acc_best_std, n), _pm(r.acc_final_mean, r.acc_final_std, n),
                 _pm(r.img_per_s_mean, r.img_per_s_std, n, 0), _num(r.compute_vs_sgd_pct, "{:.0f}%")]
        cells += [_num(r[f"paper_{c}"], {"acc": "{:.2f}", "img_per_s": "{:,.0f}", "compute_pct": "{:.1f}%"}[c])
                  for c in paper_cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


NOTES = """\
- test acc: top-1 % on the test set at the best and at the last epoch; mean ± sample std (ddof=1) over the n seeds.
- img/s: training images per second inside `optimizer.step` (warm-up steps excluded), mean over epochs, then seeds.
- compute vs SGD: time per image / SGD's time per image on the same dataset, model, hardware and batch (SGD = 100%).
- Wall-clock numbers are only comparable within one hardware row group, and only as good as the machine was quiet."""


def paper_note(table: pd.DataFrame) -> str:
    if not table.paper_source.notna().any():
        return ""
    sources = sorted(set(table.paper_source.dropna()))
    return (f"- paper columns: as printed in {'; '.join(sources)} ({PAPER_CITATION}); their GPUs and "
            "their seeds, so compare the pattern, not the digits.")


# -- plots ----------------------------------------------------------------------------------------
def _panels(frame: pd.DataFrame) -> list[tuple[tuple, pd.DataFrame]]:
    return list(frame.groupby(["dataset", "model", "hardware"], sort=True, dropna=False))


def _label(r: Any, epochs: bool = False) -> str:
    extra = f" β={r.beta:g} γ={r.gamma:g}" if r.optimizer == "esam" and not math.isnan(r.beta) else ""
    return f"{str(r.optimizer).upper()}{extra}" + (f", {r.epochs} ep" if epochs else "")


def plot_acc_vs_throughput(table: pd.DataFrame, path: Path) -> Path:
    """Best test accuracy against images/s, one panel per dataset/model/hardware, error bars = std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = _panels(table)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    for ax, ((ds, model, hw), part) in zip(axes[0], panels):
        for _, r in part.iterrows():
            ax.errorbar(r.img_per_s_mean, r.acc_best_mean, xerr=_nan0(r.img_per_s_std), yerr=_nan0(r.acc_best_std),
                        fmt="o", capsize=3, label=f"{_label(r, part.epochs.nunique() > 1)} (n={int(r.n)})")
        _finish_panel(ax, f"{ds} / {model}\n{hw}", "training images/s (higher is cheaper)",
                      "test accuracy %, best epoch")
    return _save(fig, plt, path)


def plot_curves(curves: pd.DataFrame, path: Path) -> Path | None:
    """Test accuracy per epoch, mean over seeds with a ±std band, one line per method."""
    if curves.empty:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = _panels(curves)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    keys = [k for k in GROUP_KEYS if k not in ("dataset", "model", "hardware")]
    for ax, ((ds, model, hw), part) in zip(axes[0], panels):
        for key, g in part.groupby(keys, dropna=False, sort=False):
            stats = g.groupby("epoch").test_acc.agg(["mean", "std", "size"]).reset_index()
            r = pd.Series(dict(zip(keys, key)))
            label = f"{_label(r, part.epochs.nunique() > 1)} (n={g.source.nunique()})"
            line, = ax.plot(stats.epoch, stats["mean"], label=label)
            ax.fill_between(stats.epoch, stats["mean"] - stats["std"].fillna(0), stats["mean"] + stats["std"].fillna(0),
                            color=line.get_color(), alpha=0.2)
        _finish_panel(ax, f"{ds} / {model}\n{hw}", "epoch", "test accuracy %")
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


# -- writing --------------------------------------------------------------------------------------
def write_report(runs: pd.DataFrame, curves: pd.DataFrame, out: str | Path, command: str = "",
                 plots: bool = True) -> dict[str, Path]:
    """table.md, table.csv, runs.csv (and the PNGs) into ``out``; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = summarize(runs)
    files = {"md": out / "table.md", "csv": out / "table.csv", "runs": out / "runs.csv"}
    table.to_csv(files["csv"], index=False, float_format="%.10g")
    runs.assign(extra_vs_sgd_pct=extra_vs_sgd_per_run(runs)).sort_values(
        ["dataset", "model", "optimizer", "seed"]).to_csv(files["runs"], index=False, float_format="%.10g")
    text = ["# SGD vs SAM vs ESAM", ""]
    if command:
        text += [f"Generated by `{command}` from {len(runs)} runs.", ""]
    text += [markdown_table(table), "", NOTES]
    note = paper_note(table)
    if note:
        text.append(note)
    files["md"].write_text("\n".join(text) + "\n")
    if plots:
        files["acc_vs_throughput"] = plot_acc_vs_throughput(table, out / "acc_vs_throughput.png")
        curve_png = plot_curves(curves, out / "curves.png")
        if curve_png is not None:
            files["curves"] = curve_png
    return files


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m esam.report", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", help="run folders, multirun folders or summary.json files")
    parser.add_argument("--out", default="results/table", help="folder for table.md/csv and plots")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", help="also read finished runs from wandb")
    parser.add_argument("--group", help="with --wandb: only this group (experiment_name)")
    parser.add_argument("--push", action="store_true",
                        help="with --wandb: write perf/extra_vs_sgd_pct into each run that has an SGD baseline")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    if not args.paths and not args.wandb:
        parser.error("give run folders and/or --wandb ENTITY/PROJECT")
    try:
        frames, curve_frames, wandb_runs = [], [], []
        if args.paths:
            runs, curves = load_runs(args.paths)
            frames.append(runs)
            curve_frames.append(curves)
        if args.wandb:
            runs, curves, wandb_runs = load_wandb(args.wandb, args.group)
            frames.append(runs)
            curve_frames.append(curves)
        runs = pd.concat(frames, ignore_index=True)
        curves = pd.concat(curve_frames, ignore_index=True)
        command = " ".join(["python -m esam.report", *argv])
        files = write_report(runs, curves, args.out, command=command, plots=not args.no_plots)
        if args.push:
            if not args.wandb:
                raise UserError("--push needs --wandb ENTITY/PROJECT")
            pushed = push_extra_vs_sgd(wandb_runs, runs)
            print(f"wrote perf/extra_vs_sgd_pct into {pushed} wandb runs")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(files["md"].read_text())
    print("wrote " + ", ".join(str(p) for p in files.values()))


if __name__ == "__main__":
    main()
