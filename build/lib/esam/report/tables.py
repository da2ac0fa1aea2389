"""Runs -> one row per cell (mean ± std over seeds), compute vs SGD, and their Markdown tables:
"at equal epochs" (runs of a fixed length) and "at equal compute" (runs with ``trainer.budget``)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import pandas as pd

from esam.errors import UserError
from esam.report.runs import CELL_KEYS, parse_settings, select_runs


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

METHOD_ORDER = {"sgd": 0, "sam": 1, "esam": 2}
# An SGD baseline for time per image shares these with the row (same machine label, never another).
SGD_KEYS = ["dataset", "model", "hardware", "batch_size"]
# At equal compute, a method is compared with SGD given the same budget in the same experiment.
BUDGET_KEYS = ["experiment", "dataset", "data", "model", "hardware", "batch_size", "budget"]
# Optimizer settings a table always prints where a method has them; any other setting is printed
# only where rows differ in it (lr, weight_decay, base.*, a method's switches).
HEADLINE = ("rho", "beta", "gamma")


def _key(r: Any, keys: list[str]) -> tuple:
    """A hashable key with NaN as None (NaN != NaN would never find a match)."""
    return tuple(None if isinstance(r[k], float) and math.isnan(r[k]) else r[k] for k in keys)


class SGDBaseline:
    """SGD's mean time per image for a row: from SGD runs with the same epochs if there are any,
    else from all SGD runs on the same dataset, model, hardware and batch size."""

    def __init__(self, runs: pd.DataFrame) -> None:
        sgd = runs[runs.method == "sgd"]
        exact: dict[tuple, list[float]] = {}
        loose: dict[tuple, list[float]] = {}
        for _, r in sgd.iterrows():
            if r.img_per_s > 0:
                exact.setdefault(_key(r, SGD_KEYS + ["epochs"]), []).append(1.0 / r.img_per_s)
                loose.setdefault(_key(r, SGD_KEYS), []).append(1.0 / r.img_per_s)
        self.exact = {k: sum(v) / len(v) for k, v in exact.items()}
        self.loose = {k: sum(v) / len(v) for k, v in loose.items()}

    def __call__(self, row: Any) -> float:
        return self.exact.get(_key(row, SGD_KEYS + ["epochs"]), self.loose.get(_key(row, SGD_KEYS), math.nan))


def extra_vs_sgd_per_run(runs: pd.DataFrame) -> pd.Series:
    """Per run: 100 * (its time per image / SGD's mean time per image - 1); NaN without SGD runs."""
    used = runs[runs.used] if "used" in runs else runs
    base = SGDBaseline(used)
    return pd.Series([100.0 * ((1.0 / r.img_per_s) / base(r) - 1.0) for _, r in runs.iterrows()],
                     index=runs.index, dtype=float)


def cell_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per cell (see esam.report.runs): n seeds, accuracy mean/std, img/s, compute used,
    wall time, compute vs SGD, the paper's numbers. Only runs marked ``used`` count."""
    if "used" not in runs:
        runs, _ = select_runs(runs)
    runs = runs[runs.used]
    if runs.empty:
        raise UserError("no runs to summarise")
    runs = runs.assign(time_per_img=1.0 / runs.img_per_s)
    g = runs.groupby(CELL_KEYS, dropna=False, sort=False)
    table = g.agg(
        method=("method", "first"), n=("test_acc_best", "size"),
        seeds=("seed", lambda s: ",".join(str(x) for x in sorted(s.dropna().unique()))),
        acc_best_mean=("test_acc_best", "mean"), acc_best_std=("test_acc_best", "std"),
        acc_final_mean=("test_acc_final", "mean"), acc_final_std=("test_acc_final", "std"),
        img_per_s_mean=("img_per_s", "mean"), img_per_s_std=("img_per_s", "std"),
        time_per_img=("time_per_img", "mean"),
        compute_used_mean=("compute_used", "mean"), compute_used_std=("compute_used", "std"),
        wall_time_s_mean=("wall_time_s", "mean"), wall_time_s_std=("wall_time_s", "std"),
        epochs_run_mean=("epochs_run", "mean"),
        rho=("rho", "first"), beta=("beta", "first"), gamma=("gamma", "first"),
    ).reset_index()
    base = SGDBaseline(runs)
    table["compute_vs_sgd_pct"] = [100.0 * r.time_per_img / base(r) for _, r in table.iterrows()]
    table["extra_vs_sgd_pct"] = table.compute_vs_sgd_pct - 100.0
    table["time_per_img_us"] = 1e6 * table.pop("time_per_img")
    paper = [PAPER.get((r.dataset, r.model, r.method)) for _, r in table.iterrows()]
    for field in ("acc", "img_per_s", "compute_pct", "source"):
        table[f"paper_{field}"] = [getattr(p, field, None) for p in paper]
    order = table.method.map(lambda m: METHOD_ORDER.get(m, len(METHOD_ORDER)))
    return (table.assign(_o=order)
            .sort_values(["experiment", "dataset", "data", "model", "hardware", "batch_size", "budget", "epochs",
                          "_o", "optimizer", "hparams"], kind="stable")
            .drop(columns="_o").reset_index(drop=True))


def equal_compute_table(cells: pd.DataFrame) -> pd.DataFrame:
    """The cells of budget runs, with final accuracy minus SGD's at the same budget (same
    experiment, data, model, hardware and batch); NaN where no SGD ran at that budget."""
    part = cells[cells.budget.notna()].copy()
    sgd = {_key(r, BUDGET_KEYS): r.acc_final_mean for _, r in part[part.method == "sgd"].iterrows()}
    part["acc_final_vs_sgd"] = [r.acc_final_mean - sgd.get(_key(r, BUDGET_KEYS), math.nan)
                                for _, r in part.iterrows()]
    return part.reset_index(drop=True)


# -- Markdown ---------------------------------------------------------------------------------
def shown_settings(values: list[str], always: Callable[[str], bool] = lambda k: False) -> list[str]:
    """Per row, the settings worth printing: keys with more than one value among the rows that
    have them (or that ``always`` names); flags that are off are left out."""
    parsed = [parse_settings(v) for v in values]
    keys = {k for p in parsed for k in p}
    varying = {k for k in keys if len({p[k] for p in parsed if k in p}) > 1}
    return [" ".join(f"{k}={v}" for k, v in p.items() if (k in varying or always(k)) and v not in ("False", "None"))
            for p in parsed]


def headline(k: str) -> bool:
    """The settings every row shows where its method has them (the paper's ρ, β, γ); the rest only
    where rows differ in them."""
    return k in HEADLINE


def _pm(mean: float, std: float, n: int, digits: int = 2) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    return f"{mean:.{digits}f}" if n < 2 or math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _num(v: Any, fmt: str = "{:g}") -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def _dataset(table: pd.DataFrame) -> list[str]:
    """The dataset, with the settings that tell its rows apart (label_noise=0.2), compared only
    between rows of the same dataset."""
    shown = pd.Series("", index=table.index, dtype=object)
    for _, part in table.groupby("dataset", sort=False):
        shown[part.index] = shown_settings(list(part.data))
    return [f"{d} ({s})" if s else str(d) for d, s in zip(table.dataset, shown)]


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def cells_markdown(table: pd.DataFrame) -> str:
    """The paper-style table of cells (paper columns only where the paper has numbers)."""
    paper_cols = [c for c in ("acc", "img_per_s", "compute_pct") if table[f"paper_{c}"].notna().any()]
    with_compute = int(table.compute_used_mean.notna().any())
    head = ["experiment", "dataset", "model", "hardware", "method", "settings", "batch", "epochs", "n",
            "test acc % (best)", "test acc % (final)", "img/s", "compute vs SGD"]
    head += ["compute (SGD-epochs)"] * with_compute
    head += [{"acc": "paper acc %", "img_per_s": "paper img/s", "compute_pct": "paper vs SGD"}[c] for c in paper_cols]
    lines = [_row(head), "|" + "|".join(["---"] * 6 + ["---:"] * (len(head) - 6)) + "|"]
    hp = shown_settings(list(table.hparams), always=headline)
    for (_, r), dataset, settings in zip(table.iterrows(), _dataset(table), hp):
        n = int(r.n)
        cells = [str(r.experiment), dataset, str(r.model), str(r.hardware), str(r.optimizer).upper(), settings,
                 _num(r.batch_size), _num(r.epochs), str(n),
                 _pm(r.acc_best_mean, r.acc_best_std, n), _pm(r.acc_final_mean, r.acc_final_std, n),
                 _pm(r.img_per_s_mean, r.img_per_s_std, n, 0), _num(r.compute_vs_sgd_pct, "{:.0f}%")]
        cells += [_pm(r.compute_used_mean, r.compute_used_std, n)] * with_compute
        cells += [_num(r[f"paper_{c}"], {"acc": "{:.2f}", "img_per_s": "{:,.0f}", "compute_pct": "{:.1f}%"}[c])
                  for c in paper_cols]
        lines.append(_row(cells))
    return "\n".join(lines)


def equal_compute_markdown(table: pd.DataFrame) -> str:
    """Budget runs grouped by budget: what each method reached with the compute of E SGD epochs."""
    head = ["experiment", "dataset", "model", "hardware", "budget (SGD-epochs)", "method", "settings", "batch", "n",
            "compute used", "epochs run", "wall time s", "test acc % (final)", "test acc % (best)", "final vs SGD"]
    lines = [_row(head), "|" + "|".join(["---"] * 4 + ["---:", "---", "---"] + ["---:"] * (len(head) - 7)) + "|"]
    hp = shown_settings(list(table.hparams), always=headline)
    for (_, r), dataset, settings in zip(table.iterrows(), _dataset(table), hp):
        n = int(r.n)
        cells = [str(r.experiment), dataset, str(r.model), str(r.hardware), _num(r.budget),
                 str(r.optimizer).upper(), settings, _num(r.batch_size), str(n),
                 _pm(r.compute_used_mean, r.compute_used_std, n), _num(r.epochs_run_mean, "{:.1f}"),
                 _pm(r.wall_time_s_mean, r.wall_time_s_std, n, 1),
                 _pm(r.acc_final_mean, r.acc_final_std, n), _pm(r.acc_best_mean, r.acc_best_std, n),
                 _num(r.acc_final_vs_sgd, "{:+.2f}")]
        lines.append(_row(cells))
    return "\n".join(lines)


NOTES = """\
- a row (cell) is one configuration: experiment, dataset and its settings, model, hardware, method and its settings, batch, epochs or budget; its n runs differ only in the seed, and a seed run twice counts once (the newest; see `used` in runs.csv).
- test acc: top-1 % on the test set at the best and at the last epoch; mean ± sample std (ddof=1) over the n seeds.
- img/s: training images per second inside `optimizer.step` (warm-up steps excluded), mean over epochs, then seeds.
- compute vs SGD: time per image / SGD's time per image on the same dataset, model, hardware label and batch (SGD = 100%); never across hardware labels.
- compute (SGD-epochs): what the optimizer ran, in epochs of SGD on the same data (cost units: forward 1, backward 2 per sample).
- Wall-clock numbers are only comparable within one hardware label, and only as good as the machine was quiet."""

COMPUTE_NOTES = """\
- budget: `trainer.budget=E`, the run stops after the compute of E SGD epochs on its data; SGD gets E epochs, SAM about E/2.
- compute used: SGD-epoch equivalents the run spent; wall time: measured training time (s), mean ± std over seeds.
- final vs SGD: final accuracy minus SGD's at the same budget in the same experiment (percentage points)."""


def paper_note(table: pd.DataFrame) -> str:
    if not table.paper_source.notna().any():
        return ""
    sources = sorted(set(table.paper_source.dropna()))
    return (f"- paper columns: as printed in {'; '.join(sources)} ({PAPER_CITATION}); their GPUs and "
            "their seeds, so compare the pattern, not the digits.")
