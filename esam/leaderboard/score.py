"""Selection, targets and scores. Selection and targets read a run's *validation* metrics
only (:func:`read_validation`); test accuracy is read once, by :func:`read_test`, for the
selected trial's seed re-runs, after everything has been chosen.

Rules (AlgoPerf's external tuning, Dahl et al. 2023, at this scale):
- selection: the trial with the highest final validation accuracy at the full budget (ties: the
  lower trial number); a failed (diverged) trial is never selected;
- target: the median over the baseline's seed re-runs of their final validation accuracy;
- compute-to-target of a run: ``compute_used`` (SGD-epochs) at the end of the first epoch whose
  validation accuracy is >= the target (evaluated once per epoch), infinite if none;
  of a method: the median over its seeds (so it reaches the target if most seeds do);
- performance profile: rho_m(tau) = share of workloads where the method's compute-to-target is
  within tau times the best method's; score = its area over tau in [1, TAU_MAX], divided by
  TAU_MAX - 1 (1 = fastest everywhere, 0 = never reaches a target within TAU_MAX x the best).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

TAU_MAX = 4.0  # AlgoPerf's r_max


def read_validation(run_dir: str | Path) -> list[dict[str, float]] | None:
    """Per epoch: compute_used, wall_time_s, val_acc, val_loss (and nothing else), or None for a
    failed or unfinished run. The only reader selection and targets use."""
    run_dir = Path(run_dir)
    if not (run_dir / "summary.json").is_file():
        return None
    rows = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "val_acc" not in r:
            raise ValueError(f"{run_dir}/metrics.jsonl has no val_acc: its dataset has no validation split "
                             "(dataset.val_fraction)")
        rows.append({k: float(r[k]) for k in ("epoch", "compute_used", "wall_time_s", "val_acc", "val_loss")})
    return rows


def read_test(run_dir: str | Path) -> float | None:
    """Final test accuracy of a finished run (the board's reported number, never a choice)."""
    path = Path(run_dir) / "summary.json"
    return float(json.loads(path.read_text())["test_acc_final"]) if path.is_file() else None


def final_val(history: list[dict[str, float]] | None) -> float | None:
    if not history or not math.isfinite(history[-1]["val_acc"]):
        return None
    return history[-1]["val_acc"]


def select(trials: Sequence[tuple[int, dict[str, Any], list[dict[str, float]] | None]]) -> tuple[int, dict[str, Any]] | None:
    """(trial number, hparams) of the best final validation accuracy among (number, hparams,
    validation history) triples; None if every trial failed."""
    scored = [(final_val(h), i, hp) for i, hp, h in trials if final_val(h) is not None]
    if not scored:
        return None
    best = max(scored, key=lambda t: (t[0], -t[1]))
    return best[1], best[2]


def target(baseline_histories: Sequence[list[dict[str, float]] | None]) -> float:
    vals = [final_val(h) for h in baseline_histories]
    vals = [v for v in vals if v is not None]
    if not vals:
        raise ValueError("the baseline has no finished seed re-run: no target can be set")
    return float(np.median(vals))


def compute_to_target(history: list[dict[str, float]] | None, tgt: float) -> tuple[float, float]:
    """(compute_used, wall_time_s) when validation accuracy first reached ``tgt``; (inf, inf) if never."""
    for r in history or []:
        if r["val_acc"] >= tgt - 1e-9:
            return r["compute_used"], r["wall_time_s"]
    return math.inf, math.inf


def median_with_inf(values: Sequence[float]) -> float:
    """The median, where an infinite value (target not reached) sorts last."""
    v = sorted(values)
    n = len(v)
    if n == 0:
        return math.inf
    mid = v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])
    return float(mid)


def mean_std_ci(x: Sequence[float], *, confidence: float = 0.95, n_resamples: int = 10_000,
                seed: int = 0) -> tuple[float, float, float, float]:
    """(mean, sample std, percentile-bootstrap interval of the mean). With 5 seeds a bootstrap
    interval is narrower than it should be (it cannot see beyond the 5 values); read it as such."""
    from scipy.stats import bootstrap

    a = np.asarray(x, dtype=float)
    if len(a) == 0:
        return (math.nan,) * 4
    mean, std = float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else math.nan
    if len(a) < 2 or np.ptp(a) == 0:
        return mean, std, mean, mean
    res = bootstrap((a,), np.mean, confidence_level=confidence, n_resamples=n_resamples, method="percentile",
                    rng=np.random.default_rng(seed))
    return mean, std, float(res.confidence_interval.low), float(res.confidence_interval.high)


def diff_ci(a: Sequence[float], b: Sequence[float], *, confidence: float = 0.95, n_resamples: int = 10_000,
            seed: int = 0) -> tuple[float, float, float]:
    """(mean(a) - mean(b), percentile-bootstrap interval), the two samples resampled independently."""
    from scipy.stats import bootstrap

    a, b = np.asarray(a, float), np.asarray(b, float)
    d = float(a.mean() - b.mean())
    if np.ptp(a) == 0 and np.ptp(b) == 0:
        return d, d, d
    res = bootstrap((a, b), lambda x, y, axis=-1: x.mean(axis) - y.mean(axis), confidence_level=confidence,
                    n_resamples=n_resamples, method="percentile", paired=False, rng=np.random.default_rng(seed))
    return d, float(res.confidence_interval.low), float(res.confidence_interval.high)


def performance_ratios(times: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """times[workload][method] (compute-to-target, inf if not reached) -> time / the workload's best."""
    out: dict[str, dict[str, float]] = {}
    for w, by_m in times.items():
        best = min(by_m.values())
        out[w] = {m: (t / best if math.isfinite(t) and math.isfinite(best) else math.inf) for m, t in by_m.items()}
    return out


def profile(ratios: dict[str, dict[str, float]], method: str, taus: np.ndarray) -> np.ndarray:
    """rho_method(tau): the share of workloads whose ratio is <= tau."""
    r = np.array([ratios[w][method] for w in ratios])
    return (r[None, :] <= taus[:, None] + 1e-12).mean(axis=1)


def profile_score(ratios: dict[str, dict[str, float]], method: str, tau_max: float = TAU_MAX,
                  points: int = 3001) -> float:
    """Area under rho_method over [1, tau_max], divided by tau_max - 1."""
    taus = np.linspace(1.0, tau_max, points)
    return float(np.trapezoid(profile(ratios, method, taus), taus) / (tau_max - 1.0))
