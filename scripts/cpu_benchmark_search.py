"""Summarise a hyper-parameter search on the CPU benchmark: one row per setting (mean ± std over
seeds) and each SAM-like setting's gap over SGD at the same noise, epochs, lr and model.

    python scripts/cpu_benchmark_search.py multirun/cpu-search/s1 [more dirs] [--csv runs.csv]

esam.report groups runs by method, rho/beta/gamma and epochs only; a search also varies the label
noise and the lr, so this reads those from each run's config (summary.json's "config").
"""
from __future__ import annotations

import argparse
import json

import pandas as pd

from esam.report import find_summaries

# (column, dotted config key): what the search varies besides the seed.
SETTING = [("noise", "dataset.label_noise"), ("model", "model.name"), ("epochs", "trainer.epochs"),
           ("budget", "trainer.budget"),
           ("lr", "optimizer.lr"), ("wd", "optimizer.weight_decay"), ("method", "optimizer.label"),
           ("rho", "optimizer.rho"), ("beta", "optimizer.beta"), ("gamma", "optimizer.gamma")]
BASELINE_KEYS = ["noise", "model", "epochs", "budget", "lr", "wd"]


def dig(config: dict, dotted: str):
    for k in dotted.split("."):
        config = config.get(k) if isinstance(config, dict) else None
    return config


def load(paths: list[str]) -> pd.DataFrame:
    rows = []
    for path in find_summaries(paths):
        s = json.loads(path.read_text())
        rows.append({**{col: dig(s["config"], key) for col, key in SETTING}, "seed": s["seed"],
                     "final": s["test_acc_final"], "best": s["test_acc_best"], "run_dir": str(path.parent)})
    # A setting and seed run twice (e.g. to check that two trainer versions agree) counts once.
    return pd.DataFrame(rows).drop_duplicates([c for c, _ in SETTING] + ["seed"], keep="last")


def settings_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean/std per setting; for non-SGD rows the gap over SGD (final accuracy) and whether it
    exceeds twice the larger of the two seed stds."""
    keys = [c for c, _ in SETTING]
    g = runs.fillna({"budget": -1, "rho": -1, "beta": -1, "gamma": -1}).groupby(keys, sort=True)
    t = g.agg(n=("final", "size"), final=("final", "mean"), final_std=("final", "std"),
              best=("best", "mean"), best_std=("best", "std")).reset_index()
    sgd = t[t.method == "sgd"].set_index(BASELINE_KEYS)[["final", "final_std"]]
    gaps, clears = [], []
    for r in t.itertuples():
        key = tuple(getattr(r, k) for k in BASELINE_KEYS)
        if r.method == "sgd" or key not in sgd.index:
            gaps.append(None), clears.append("")
            continue
        base = sgd.loc[key]
        gap = r.final - base.final
        gaps.append(round(gap, 2))
        clears.append("yes" if gap > 2 * max(r.final_std, base.final_std) else "no")
    t["gap_vs_sgd"], t["gap_gt_2std"] = gaps, clears
    return t.replace({-1: None})


def best_vs_best(t: pd.DataFrame) -> str:
    """Per noise rate and epochs: each method's best setting (final accuracy), and SAM's best against
    SGD's best, whatever their lr: the comparison that does not favour a method by its tuning."""
    lines = []
    for (noise, epochs), part in t[t.budget.isna()].groupby(["noise", "epochs"]):
        best = part.loc[part.groupby("method").final.idxmax()].set_index("method")
        if not {"sgd", "sam"} <= set(best.index):
            continue
        a, b = best.loc["sam"], best.loc["sgd"]
        gap, bar = a.final - b.final, 2 * max(a.final_std, b.final_std)
        lines.append(f"- noise {noise:g}, {epochs} epochs: best SAM (lr {a.lr:g}, rho {a.rho:g}, n={a.n}) {a.final:.2f} ± {a.final_std:.2f}"
                     f" vs best SGD (lr {b.lr:g}, n={b.n}) {b.final:.2f} ± {b.final_std:.2f}: gap {gap:+.2f},"
                     f" twice the larger std {bar:.2f} -> {'clears' if gap > bar else 'does not clear'} it")
    return "\n".join(lines)


def markdown(t: pd.DataFrame) -> str:
    head = ["noise", "model", "epochs", "budget", "lr", "wd", "method", "ρ", "n", "final acc %", "best acc %",
            "final gap vs SGD", "> 2 std"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in t.itertuples():
        rho = "" if r.rho is None or pd.isna(r.rho) else f"{r.rho:g}"
        gap = "" if r.gap_vs_sgd is None or pd.isna(r.gap_vs_sgd) else f"{r.gap_vs_sgd:+.2f}"
        budget = "" if r.budget is None or pd.isna(r.budget) else f"{r.budget:g}"
        lines.append(f"| {r.noise:g} | {r.model} | {r.epochs} | {budget} | {r.lr:g} | {r.wd:g} | {r.method} | {rho} | {r.n} "
                     f"| {r.final:.2f} ± {r.final_std:.2f} | {r.best:.2f} ± {r.best_std:.2f} | {gap} | {r.gap_gt_2std} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="multirun or run folders")
    parser.add_argument("--csv", help="also write one row per run here")
    args = parser.parse_args()
    runs = load(args.paths)
    if args.csv:
        runs.drop(columns="run_dir").sort_values([c for c, _ in SETTING] + ["seed"]).to_csv(args.csv, index=False)
    table = settings_table(runs)
    print(markdown(table))
    print()
    print(best_vs_best(table))


if __name__ == "__main__":
    main()
