"""The leaderboard's rules: declared search spaces, quasi-random trials, selection and targets
on validation only, compute-to-target, profiles and their score, and a resumable run."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from esam.errors import UserError
from esam.leaderboard import score
from esam.leaderboard.plan import final_jobs, load_suite, trial_jobs
from esam.leaderboard.space import SPACE_DIR, load_space, trials_for
from esam.optim.registry import METHODS

NO_RHO = {"sgd", "saf", "mesa"}  # no sharpness radius to tune (SGD: weight decay instead)


def test_every_registered_method_declares_a_search_space_and_is_on_the_cpu_board():
    suite = load_suite("cpu")
    assert sorted(suite.methods) == sorted(METHODS) == sorted(p.stem for p in SPACE_DIR.glob("*.yaml"))
    for m in METHODS:
        space = load_space(m)
        names = {p.name for p in space.params}
        assert "lr" in names and (m in NO_RHO or "rho" in names), m
        assert len(names) >= 2, f"{m} tunes only {names}"
        assert space.optimizer == m


def test_every_method_gets_the_same_number_of_trials_on_every_workload():
    suite = load_suite("cpu")
    assert suite.trials >= 8 and len(suite.seeds) >= 5 and suite.trial_seed not in suite.seeds
    jobs = trial_jobs(suite)
    counts = {(j.workload, j.method) for j in jobs}
    assert len(counts) == len(suite.workloads) * len(suite.methods)
    assert len(jobs) == len(counts) * suite.trials
    assert len({j.run_dir for j in jobs}) == len(jobs)


def test_trials_are_a_scrambled_sobol_net_inside_the_declared_ranges():
    """8 Sobol points in base 2: each knob's 8 values fall one in each eighth of its range (in
    log space for log knobs), and the same suite draws the same trials again."""
    space = load_space("esam")
    trials = trials_for("digits_noisy", "esam", 8)
    assert trials == trials_for("digits_noisy", "esam", 8)
    assert trials != trials_for("mnist1d", "esam", 8)
    for p in space.params:
        v = np.array([t[p.name] for t in trials])
        assert np.all((v >= p.low) & (v <= p.high)), p.name
        u = (np.log(v / p.low) / math.log(p.high / p.low)) if p.log else (v - p.low) / (p.high - p.low)
        assert sorted(np.floor(u * 8).astype(int).tolist()) == list(range(8)), p.name


def test_integer_knobs_are_integers_over_their_whole_range():
    ks = [t["k"] for t in trials_for("w", "looksam", 64)]
    assert all(isinstance(k, int) for k in ks) and set(ks) == set(range(2, 11))


def test_trial_overrides_carry_the_method_its_fixed_settings_and_the_drawn_values():
    suite = load_suite("cpu")
    job = next(j for j in trial_jobs(suite) if j.method == "gsam" and j.workload == "mnist1d" and j.index == 3)
    assert job.overrides[:3] == ("+workload=mnist1d", "optimizer=gsam", "optimizer.rho_min=${optimizer.rho}")
    assert f"optimizer.lr={job.hparams['lr']:.6g}" in job.overrides and "seed=0" in job.overrides
    assert job.run_dir == suite.root / "mnist1d" / "gsam" / "trial03"


def test_a_bad_search_space_fails_naming_the_key(tmp_path):
    (tmp_path / "x.yaml").write_text("optimizer: sam\nparams:\n  lr: {low: 0.1, high: 0.01}\n")
    with pytest.raises(UserError, match=r"x.yaml: params.lr must be \{low, high\[, log\]\[, int\]\} with low < high"):
        load_space("x", tmp_path)
    with pytest.raises(UserError, match="method 'nope' has no search space"):
        load_space("nope", tmp_path)


# -- selection and targets read validation only ----------------------------------------------
def _fake_run(folder: Path, val: list[float], test: list[float], compute: list[float]) -> Path:
    folder.mkdir(parents=True)
    lines = [{"epoch": i + 1, "compute_used": c, "wall_time_s": float(i + 1), "val_acc": v, "val_loss": 1.0,
              "test_acc": t, "test_loss": 1.0, "train_acc": 50.0} for i, (v, t, c) in enumerate(zip(val, test, compute))]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (folder / "summary.json").write_text(json.dumps({"test_acc_final": test[-1], "test_acc_best": max(test),
                                                     "val_acc_final": val[-1]}))
    return folder


def test_selection_and_target_read_validation_metrics_only(tmp_path):
    """Trial 0 is best on test, trial 1 on validation: trial 1 is selected. Then every test number
    is changed: selection, target and compute-to-target stay exactly the same."""
    a = _fake_run(tmp_path / "t0", val=[40, 50], test=[90, 99], compute=[1, 2])
    b = _fake_run(tmp_path / "t1", val=[45, 55], test=[60, 70], compute=[1, 2])
    hist = {d: score.read_validation(d) for d in (a, b)}
    assert all(set(r) == {"epoch", "compute_used", "wall_time_s", "val_acc", "val_loss"} for h in hist.values() for r in h)
    picked = score.select([(0, {"lr": 0.1}, hist[a]), (1, {"lr": 0.2}, hist[b])])
    assert picked == (1, {"lr": 0.2})
    before = (picked, score.target([hist[a], hist[b]]), score.compute_to_target(hist[b], 52.0))

    for d in (a, b):  # poison every test metric
        rows = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
        (d / "metrics.jsonl").write_text("".join(json.dumps({**r, "test_acc": 100 - r["test_acc"]}) + "\n" for r in rows))
        s = json.loads((d / "summary.json").read_text())
        (d / "summary.json").write_text(json.dumps({**s, "test_acc_final": 0.0, "test_acc_best": 0.0}))
    hist = {d: score.read_validation(d) for d in (a, b)}
    after = (score.select([(0, {"lr": 0.1}, hist[a]), (1, {"lr": 0.2}, hist[b])]),
             score.target([hist[a], hist[b]]), score.compute_to_target(hist[b], 52.0))
    assert after == before
    assert before[1] == 52.5 and before[2] == (2.0, 2.0)


def test_a_failed_trial_is_never_selected_and_ties_go_to_the_lower_trial(tmp_path):
    good = score.read_validation(_fake_run(tmp_path / "g", val=[30, 50], test=[1, 1], compute=[1, 2]))
    same = score.read_validation(_fake_run(tmp_path / "s", val=[10, 50], test=[1, 1], compute=[1, 2]))
    failed = score.read_validation(tmp_path / "missing")
    assert failed is None
    assert score.select([(0, {"a": 0}, failed), (1, {"a": 1}, same), (2, {"a": 2}, good)]) == (1, {"a": 1})
    assert score.select([(0, {}, None)]) is None


def test_compute_to_target_is_the_first_epoch_at_or_above_it():
    h = [{"epoch": 1, "compute_used": 2.0, "wall_time_s": 1.0, "val_acc": 40.0, "val_loss": 1.0},
         {"epoch": 2, "compute_used": 4.0, "wall_time_s": 2.0, "val_acc": 60.0, "val_loss": 1.0},
         {"epoch": 3, "compute_used": 6.0, "wall_time_s": 3.0, "val_acc": 55.0, "val_loss": 1.0}]
    assert score.compute_to_target(h, 60.0) == (4.0, 2.0)
    assert score.compute_to_target(h, 61.0) == (math.inf, math.inf)
    # A method reaches the target if most of its seeds do: the median counts a miss as infinite.
    assert score.median_with_inf([3.0, math.inf, 5.0]) == 5.0
    assert score.median_with_inf([3.0, math.inf, math.inf]) == math.inf


def test_performance_profile_score_by_hand():
    """A is fastest on both workloads (score 1). B takes 2x A's compute on w1 and misses w2:
    rho_B = 0 below tau 2, 1/2 from tau 2 to 4: area 1/2 x 2 over a range of 3 = 1/3. C never."""
    times = {"w1": {"A": 2.0, "B": 4.0, "C": math.inf}, "w2": {"A": 1.0, "B": math.inf, "C": math.inf}}
    ratios = score.performance_ratios(times)
    assert ratios["w1"] == {"A": 1.0, "B": 2.0, "C": math.inf}
    assert score.profile_score(ratios, "A") == pytest.approx(1.0)
    assert score.profile_score(ratios, "B") == pytest.approx(1 / 3, abs=1e-3)
    assert score.profile_score(ratios, "C") == 0.0


def test_mean_std_and_bootstrap_interval():
    x = [90.0, 91.0, 93.0, 92.0, 94.0]
    mean, std, lo, hi = score.mean_std_ci(x)
    assert mean == 92.0 and std == pytest.approx(np.std(x, ddof=1))
    assert 90.0 <= lo < mean < hi <= 94.0
    assert score.mean_std_ci([5.0, 5.0]) == (5.0, 0.0, 5.0, 5.0)
    d, lo, hi = score.diff_ci([3.0, 4.0, 5.0], [1.0, 2.0, 3.0])
    assert d == 2.0 and lo <= d <= hi


def test_a_run_composed_once_per_method_is_the_config_hydra_composes_per_run(compose_train):
    from omegaconf import OmegaConf

    from esam.leaderboard.execute import compose_run

    job = next(j for j in trial_jobs(load_suite("cpu")) if j.method == "gsam" and j.index == 5)
    first = compose_run(job.overrides)  # composes the base, then sets the values
    other = next(j for j in trial_jobs(load_suite("cpu")) if j.method == "gsam" and j.index == 6 and j.workload == job.workload)
    compose_run(other.overrides)        # reuses the base: must not leak into the first
    for j in (job, other):
        assert OmegaConf.to_container(compose_run(j.overrides)) == OmegaConf.to_container(compose_train(list(j.overrides)))
    # GSAM like-for-like: rho_min follows the trial's rho (a constant radius), not the recipe's sam.rho
    assert first.optimizer.lr == job.hparams["lr"] and first.optimizer.rho_min == job.hparams["rho"]


def test_final_runs_change_folder_when_the_selection_changes():
    suite = load_suite("cpu")
    a = final_jobs(suite, {("mnist1d", "sam"): {"lr": 0.1, "rho": 0.2}})
    b = final_jobs(suite, {("mnist1d", "sam"): {"lr": 0.1, "rho": 0.3}})
    assert [j.index for j in a] == suite.seeds
    assert a[0].run_dir.parent != b[0].run_dir.parent and a[0].run_dir.name == "seed1"
    assert final_jobs(suite, {("mnist1d", "sam"): None}) == []


# -- the whole board, tiny, twice -------------------------------------------------------------
TINY = """workloads: [digits_noisy]
methods: [sgd, sam]
baseline: sgd
trials: 1
trial_seed: 0
seeds: [1]
root: {root}
out: {out}
n_jobs: 1
overrides: ["workload.budget=1", "dataset.batch_size=256"]
"""


def test_tiny_board_writes_the_issue_columns_and_a_rerun_trains_nothing(tmp_path):
    from esam.leaderboard.__main__ import main

    (tmp_path / "tiny.yaml").write_text(TINY.format(root=tmp_path / "runs", out=tmp_path / "out"))
    args = ["--suite", "tiny", "--suite-dir", str(tmp_path)]
    first = main(args)
    assert first["launched"] == {"trials": 2, "finals": 2}
    with open(tmp_path / "out" / "leaderboard.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["workload", "method", "trials", "selected_hparams", "seeds", "target",
                             "compute_to_target", "reached_target", "test_acc_mean", "test_acc_std",
                             "test_acc_ci_low", "test_acc_ci_high"]
    assert [(r["workload"], r["method"], r["trials"], r["seeds"]) for r in rows] == \
        [("digits_noisy", "sgd", "1", "1"), ("digits_noisy", "sam", "1", "1")]
    # The target is the tuned SGD's final validation accuracy (one seed here), which SGD reaches.
    sgd_final = next((tmp_path / "runs" / "digits_noisy" / "sgd").glob("final-*/seed1"))
    assert float(rows[0]["target"]) == pytest.approx(json.loads((sgd_final / "summary.json").read_text())["val_acc_final"], abs=0.01)
    assert rows[0]["reached_target"] == "True"
    assert (sgd_final / "command.txt").read_text().startswith("python -m esam.train +workload=digits_noisy optimizer=sgd")
    for name in ("table.md", "trials.csv", "runs.csv", "profiles.png", "test_acc.png", "compute_to_target.png"):
        assert (tmp_path / "out" / name).is_file(), name

    def no_training(*args, **kwargs):
        raise AssertionError("a finished board launched a run")

    second = main(args, runner=no_training)
    assert second["launched"] == {"trials": 0, "finals": 0}
    with open(tmp_path / "out" / "leaderboard.csv") as f:
        assert list(csv.DictReader(f)) == rows
    log = [json.loads(l) for l in (tmp_path / "out" / "make_log.jsonl").read_text().splitlines()]
    assert [(e["launched_trials"], e["launched_finals"]) for e in log] == [(2, 2), (0, 0)]
