"""esam.report: hand-written summaries give exact means, stds and SGD ratios; a real multirun gives
the right rows; wandb runs convert to the same rows (fake API objects, no network)."""
from __future__ import annotations

import json
import os
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from esam.errors import UserError
from esam.loggers import wandb_key
from esam.report import main as report_main
from esam.report import (PAPER, cell_table, curves_from_wandb, cells_markdown, equal_compute_markdown, equal_compute_table, load_runs,
                         load_wandb, pareto_front, push_extra_vs_sgd, row_from_wandb, runs_frame,
                         select_runs, write_report)
from esam.train import run
from helpers import FAST, REPO, compose_cfg, run_cli

GPU = {"device": "cuda", "device_name": "NVIDIA A100", "world_size": 1, "precision": "bf16", "num_threads": 8}


def summary(dataset: str, model: str, optimizer: str, seed: int, best: float, final: float, img_s: float,
            **extra) -> dict:
    hyper = {"sgd": {}, "sam": {"rho": 0.05}, "esam": {"rho": 0.05, "beta": 0.6, "gamma": 0.5}}[optimizer]
    return {"status": "completed", "dataset": dataset, "model": model, "optimizer": optimizer, "seed": seed,
            "epochs": 200, "batch_size": 128, "test_acc_best": best, "test_acc_final": final, "img_per_s": img_s,
            "experiment": f"{dataset}_{model}", **GPU, "config": {"optimizer": {"name": optimizer, **hyper}}, **extra}


def write_run(folder: Path, s: dict, accs: list[float] | None = None) -> None:
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(s))
    accs = accs or [s["test_acc_final"]]
    (folder / "metrics.jsonl").write_text("".join(
        json.dumps({"epoch": i + 1, "test_acc": a, "train_loss": 1.0 / (i + 1)}) + "\n" for i, a in enumerate(accs)))


@pytest.fixture
def hand_written(tmp_path: Path) -> Path:
    """CIFAR-10 ResNet-18: 3 seeds of SGD, SAM and ESAM; 1 synthetic ESAM run (no SGD to compare)."""
    root = tmp_path / "runs"
    table = {
        "sgd": ([95.0, 95.5, 96.0], [94.9, 95.4, 95.9], [1000.0, 1000.0, 1000.0]),
        "sam": ([96.0, 96.5, 97.0], [96.0, 96.4, 96.8], [500.0, 500.0, 500.0]),
        "esam": ([96.2, 96.6, 97.0], [96.1, 96.5, 96.9], [500.0, 1000.0, 1000.0]),
    }
    for method, (best, final, img) in table.items():
        for seed in range(3):
            # Nested like a multirun folder, to check the search is recursive.
            write_run(root / "multirun" / method / f"{seed}-run", summary("cifar10", "resnet18", method, seed,
                                                                          best[seed], final[seed], img[seed]),
                      accs=[50.0 + seed, best[seed], final[seed]])
    write_run(root / "synthetic", summary("synthetic", "resnet18", "esam", 0, 10.0, 9.0, 300.0,
                                          device="cpu", device_name="x86_64", precision="fp32", num_threads=2))
    return root


def test_hand_written_summaries_give_exact_table(hand_written, tmp_path):
    runs, curves = load_runs([hand_written])
    assert len(runs) == 10 and len(curves) == 9 * 3 + 1
    t = cell_table(runs).set_index(["dataset", "optimizer"])
    sgd, sam, esam = t.loc[("cifar10", "sgd")], t.loc[("cifar10", "sam")], t.loc[("cifar10", "esam")]
    assert (sgd.n, sgd.seeds) == (3, "0,1,2")
    assert sgd.acc_best_mean == pytest.approx(95.5) and sgd.acc_best_std == pytest.approx(0.5)  # ddof=1
    assert sgd.acc_final_mean == pytest.approx(95.4) and sgd.acc_final_std == pytest.approx(0.5)
    assert sam.acc_final_std == pytest.approx(0.4)
    assert sgd.compute_vs_sgd_pct == pytest.approx(100.0) and sam.compute_vs_sgd_pct == pytest.approx(200.0)
    # Time per image is averaged, not images/s: (2 + 1 + 1) / 3 ms per 1000 images vs SGD's 1.
    assert esam.compute_vs_sgd_pct == pytest.approx(400.0 / 3)
    assert esam.img_per_s_mean == pytest.approx(2500.0 / 3)
    assert (esam.rho, esam.beta, esam.gamma) == (0.05, 0.6, 0.5) and math.isnan(sgd.rho)
    assert esam.paper_compute_pct == PAPER[("cifar10", "resnet18", "esam")].compute_pct == 140.0
    syn = t.loc[("synthetic", "esam")]
    assert syn.n == 1 and math.isnan(syn.acc_best_std) and math.isnan(syn.compute_vs_sgd_pct)
    assert syn.hardware == "x86_64, fp32, 2 thr"

    files = write_report(runs, curves, tmp_path / "out", command="python -m esam.report runs")
    md = files["md"].read_text()
    assert ("| cifar10_resnet18 | cifar10 | resnet18 | NVIDIA A100, bf16 | SGD |  | 128 | 200 | 3 | 95.50 ± 0.50 | "
            "95.40 ± 0.50 | 1000 ± 0 | 100% | 100.0% |") in md
    assert "| SAM | rho=0.05 | 128 | 200 | 3 | 96.50 ± 0.50 | 96.40 ± 0.40 | 500 ± 0 | 200% | 200.0% |" in md
    assert ("| synthetic_resnet18 | synthetic | resnet18 | x86_64, fp32, 2 thr | ESAM | beta=0.6 gamma=0.5 rho=0.05 | "
            "128 | 200 | 1 | 10.00 | 9.00 | 300 |  |  |") in md
    assert "Du et al. 2022, abstract" in md and "python -m esam.report runs" in md
    assert "from 10 runs: 10 used, 0 left out" in md and "No runs with `trainer.budget`" in md
    # Method order within a block: SGD, SAM, ESAM.
    assert md.index("| SGD |") < md.index("| SAM |") < md.index("| ESAM | beta=0.6 gamma=0.5 rho=0.05 | 128 | 200 | 3")
    csv = pd.read_csv(files["csv"])
    assert len(csv) == 4 and set(csv.optimizer) == {"sgd", "sam", "esam"}
    per_run = pd.read_csv(files["runs"])
    assert len(per_run) == 10 and per_run.used.all()
    assert per_run[per_run.optimizer == "sam"].extra_vs_sgd_pct.tolist() == pytest.approx([100.0] * 3)
    for png in ("acc_vs_throughput", "curves"):
        assert files[png].stat().st_size > 1000


def test_seeds_of_different_settings_are_not_pooled(tmp_path):
    for seed, beta in ((0, 0.6), (1, 0.6), (2, 0.8)):
        s = summary("digits", "resnet_digits", "esam", seed, 90.0 + seed, 90.0, 100.0)
        s["config"]["optimizer"]["beta"] = beta
        write_run(tmp_path / f"r{seed}", s)
    t = cell_table(load_runs([tmp_path])[0])
    assert sorted(zip(t.beta, t.n)) == [(0.6, 2), (0.8, 1)]


def test_hyperparameters_come_from_the_config_not_legacy_top_level_keys(tmp_path):
    """summary.json's old top-level rho/beta/gamma are not read: the resolved config is the one source."""
    s = summary("digits", "resnet_digits", "esam", 0, 90.0, 90.0, 100.0, rho=0.5, beta=0.9, gamma=0.9)
    write_run(tmp_path / "r", s)
    row = load_runs([tmp_path])[0].iloc[0]
    assert (row.rho, row.beta, row.gamma, row.hparams) == (0.05, 0.6, 0.5, "beta=0.6 gamma=0.5 rho=0.05")
    del s["config"]  # a summary from before configs were saved: still read, without settings
    write_run(tmp_path / "old", s)
    old = load_runs([tmp_path / "old"])[0].iloc[0]
    assert old.hparams == "" and math.isnan(old.rho) and old.test_acc_best == 90.0


@pytest.mark.slow  # starts a Python process: in `make test`, not `make test-fast`
def test_multirun_of_two_methods_and_two_seeds(tmp_path):
    sweep = tmp_path / "multirun"
    proc = run_cli(["-m", "optimizer=sgd,esam", "seed=0,1", "trainer=debug", *FAST, "trainer.num_threads=1",
                    f"hydra.sweep.dir={sweep}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    # A synthetic (CIFAR-shaped) run in the same report: its own row, no SGD to compare with.
    syn = ["dataset=synthetic", "dataset.num_train=128", "dataset.num_test=64", "dataset.image_size=8",
           "model=resnet_digits", "optimizer=sam", "trainer=debug", *FAST]
    run(compose_cfg(syn), tmp_path / "synthetic")
    out = tmp_path / "report"
    proc = run_cli([str(sweep), str(tmp_path / "synthetic"), "--out", str(out)], module="esam.report")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| digits | resnet_digits |" in proc.stdout and "| synthetic | resnet_digits |" in proc.stdout

    table = pd.read_csv(out / "table.csv")
    assert [(r.dataset, r.optimizer, r.n) for r in table.itertuples()] == [
        ("digits", "sgd", 2), ("digits", "esam", 2), ("synthetic", "sam", 1)]
    for method in ("sgd", "esam"):
        accs = [json.loads(p.read_text())["test_acc_best"] for p in sweep.glob(f"*-{method}-seed*/summary.json")]
        assert len(accs) == 2
        row = table[(table.dataset == "digits") & (table.optimizer == method)].iloc[0]
        assert row.acc_best_mean == pytest.approx(statistics.mean(accs))
        assert row.acc_best_std == pytest.approx(statistics.stdev(accs), abs=1e-6)
    assert table[table.optimizer == "sgd"].compute_vs_sgd_pct.item() == pytest.approx(100.0)
    assert (out / "acc_vs_throughput.png").is_file() and (out / "curves.png").is_file()


def test_missing_or_empty_folders_fail_with_one_sentence(tmp_path):
    proc = run_cli([str(tmp_path / "nope")], module="esam.report")
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    with pytest.raises(UserError, match="no summary.json"):
        load_runs([tmp_path])


# -- wandb, with stand-ins for wandb.Api() objects ----------------------------------------------
class FakeSummary(dict):
    def update(self, values=None):  # the public API persists on update()
        super().update(values or {})
        self.pushed = dict(values or {})


class FakeRun:
    def __init__(self, run_id: str, summary: dict, config: dict, history: list[dict] | None = None):
        self.id, self.path = run_id, ["ent", "proj", run_id]
        self.summary, self.config, self._history = FakeSummary(summary), config, history or []

    def history(self, keys=None, pandas=True):
        return [{k: h[k] for k in h if keys is None or k in keys} for h in self._history]


class FakeApi:
    def __init__(self, runs):
        self._runs, self.calls = runs, []

    def runs(self, path, filters=None):
        self.calls.append((path, filters))
        return self._runs


def logged_run(run_id: str, optimizer: str, seed: int, acc: float, img_s: float) -> FakeRun:
    """What esam.loggers leaves in wandb: prefixed summary keys, the resolved config, epoch history."""
    s = summary("cifar10", "resnet18", optimizer, seed, acc, acc - 0.1, img_s)
    wb_summary = {wandb_key(k): v for k, v in s.items() if isinstance(v, (int, float, str))}
    config = {"seed": seed, "experiment_name": "cifar10_resnet18",
              "dataset": {"name": "cifar10", "batch_size": 128},
              "model": {"name": "resnet18"}, "trainer": {"epochs": 200},
              "optimizer": s["config"]["optimizer"]}
    history = [{"epoch": 1, "test/acc": acc - 5, "train/loss": 1.0, "_step": 0},
               {"epoch": 2, "test/acc": acc, "train/loss": 0.5, "_step": 1}]
    return FakeRun(run_id, wb_summary, config, history)


def test_logger_uses_the_names_report_and_dashboard_read():
    assert wandb_key("test_acc_best") == "test/acc_best"
    assert wandb_key("img_per_s") == "perf/img_per_s"
    assert wandb_key("train_loss") == "train/loss"


def test_wandb_runs_convert_to_the_same_rows():
    runs = [logged_run("a", "sgd", 0, 95.0, 1000.0), logged_run("b", "sgd", 1, 96.0, 1000.0),
            logged_run("c", "sam", 0, 96.5, 500.0)]
    # Older runs: bare img_per_s, fields only in the config in the raw {"value": ...} form.
    old = FakeRun("d", {"test/acc_best": 97.0, "img_per_s": 500.0, "precision": "bf16", **GPU},
                  {"dataset": {"value": {"name": "cifar10", "batch_size": 128}}, "model": {"value": {"name": "resnet18"}},
                   "optimizer": {"value": {"name": "sam", "rho": 0.05}}, "seed": {"value": 1},
                   "trainer": {"value": {"epochs": 200}}, "experiment_name": {"value": "cifar10_resnet18"}})
    junk = FakeRun("e", {"loss": 1.0}, {})  # not a run of this benchmark
    api = FakeApi(runs + [old, junk])
    frame, curves, kept = load_wandb("ent/proj", group="cifar10_resnet18", api=api)
    assert api.calls == [("ent/proj", {"state": "finished", "jobType": "train", "group": "cifar10_resnet18"})]
    assert [r.id for r in kept] == ["a", "b", "c", "d"]
    assert row_from_wandb(junk) is None
    assert frame.source.tolist()[0] == "wandb:ent/proj/a"
    t = cell_table(frame).set_index("optimizer")
    assert t.loc["sgd"].n == 2 and t.loc["sgd"].acc_best_mean == pytest.approx(95.5)
    assert t.loc["sgd"].acc_best_std == pytest.approx(statistics.stdev([95.0, 96.0]))
    assert t.loc["sam"].n == 2 and t.loc["sam"].compute_vs_sgd_pct == pytest.approx(200.0)
    assert len(curves) == 3 * 2 and set(curves.epoch) == {1, 2}  # the old run has no history
    assert "| SAM | rho=0.05 |" in cells_markdown(cell_table(frame))

    # The compute keys esam.loggers puts in a run's summary come back as the report's columns.
    s = budget_run("sam", 3, 4, 84.0, 4.02, 11.5, epochs=2)
    s["config"]["trainer"]["budget"] = None  # wandb's config may lack it: the summary's budget counts
    budget = FakeRun("f", {wandb_key(k): v for k, v in s.items() if isinstance(v, (int, float, str))},
                     {"experiment_name": "equal_compute", **s["config"]},
                     [{"epoch": 1, "test/acc": 80.0, "compute/used": 2.01, "perf/wall_time_s": 5.0}])
    row = row_from_wandb(budget)
    assert (row["budget"], row["compute_used"], row["wall_time_s"], row["epochs_run"]) == (4.0, 4.02, 11.5, 2.0)
    assert curves_from_wandb(budget, row)[0]["compute_used"] == 2.01

    assert push_extra_vs_sgd(kept, frame) == 4
    assert runs[2].summary.pushed == {"perf/extra_vs_sgd_pct": pytest.approx(100.0)}
    assert runs[0].summary["perf/extra_vs_sgd_pct"] == pytest.approx(0.0)


# -- hardware labels: one machine, one name -----------------------------------------------------
def test_device_name_is_the_cpu_model_not_the_architecture(tmp_path, monkeypatch):
    import platform

    import torch

    from esam.runtime import device_name

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13 64-Core Processor\n")
    assert device_name(torch.device("cpu"), cpuinfo=info) == "AMD EPYC 7B13 64-Core Processor"
    # No /proc/cpuinfo (macOS, Windows): what the platform names the processor.
    monkeypatch.setattr(platform, "processor", lambda: "arm")
    assert device_name(torch.device("cpu"), cpuinfo=tmp_path / "absent") == "arm"
    if Path("/proc/cpuinfo").is_file() and "model name" in Path("/proc/cpuinfo").read_text():
        assert device_name(torch.device("cpu")) not in ("x86_64", "", "cpu")


def test_sgd_baseline_never_crosses_hardware_labels(tmp_path):
    cpu = {"device": "cpu", "precision": "fp32", "num_threads": 2}
    # An old summary (label x86_64) and a new one (CPU model) of SGD; SAM only on the new machine.
    write_run(tmp_path / "old-sgd", summary("digits", "m", "sgd", 0, 90.0, 90.0, 1000.0, **cpu, device_name="x86_64"))
    write_run(tmp_path / "new-sam", summary("digits", "m", "sam", 0, 91.0, 91.0, 400.0, **cpu, device_name="AMD EPYC 7B13"))
    t = cell_table(load_runs([tmp_path])[0]).set_index("optimizer")
    assert t.loc["sgd"].hardware == "x86_64, fp32, 2 thr"
    assert t.loc["sam"].hardware == "AMD EPYC 7B13, fp32, 2 thr"
    assert math.isnan(t.loc["sam"].compute_vs_sgd_pct)  # no SGD on that machine: no ratio
    write_run(tmp_path / "new-sgd", summary("digits", "m", "sgd", 0, 90.0, 90.0, 800.0, **cpu, device_name="AMD EPYC 7B13"))
    t = cell_table(load_runs([tmp_path])[0])
    sam = t[t.optimizer == "sam"].iloc[0]
    assert sam.compute_vs_sgd_pct == pytest.approx(200.0)  # 800/400, not against the x86_64 SGD's 1000


# -- one cell = one configuration; a repeated seed counts once ---------------------------------
def digits_run(experiment: str, optimizer: str, seed: int, acc: float, *, lr: float = 0.05, noise: float = 0.0,
               finished: float | None = None, **extra) -> dict:
    """A summary as the trainer writes it (with the resolved config), on digits, CPU."""
    s = summary("digits", "resnet_digits", optimizer, seed, acc, acc, 1000.0, device="cpu",
                device_name="AMD EPYC 7B13", precision="fp32", num_threads=1, experiment=experiment, epochs=30,
                **extra)
    hyper = {k: v for k, v in s["config"]["optimizer"].items() if k != "name"}
    s["config"] = {"experiment_name": experiment, "seed": seed,
                   "dataset": {"name": "digits", "root": "data", "batch_size": 128, "test_size": 0.2,
                               "label_noise": noise},
                   "optimizer": {"name": optimizer, "label": optimizer, "lr": lr, "weight_decay": 1e-3,
                                 "base": {"name": "sgd", "momentum": 0.9},
                                 **hyper},
                   "trainer": {"epochs": 30, "budget": extra.get("budget")}}
    if finished is not None:
        s["finished_at"] = finished
    return s


def test_repeated_seed_counts_once_the_newest_with_a_warning(tmp_path, capsys):
    """The issue's case: the demo-like default run, a rerun and a sweep's seed 0 of one
    configuration were three samples (n=5 for seeds 0,1,2); now seed 0 counts once, the newest."""
    for i, (acc, t) in enumerate(((80.0, 100.0), (85.0, 300.0), (90.0, 200.0))):
        write_run(tmp_path / f"seed0-{i}", digits_run("digits", "sgd", 0, acc, finished=t))
    for seed in (1, 2):
        write_run(tmp_path / f"seed{seed}", digits_run("digits", "sgd", seed, 86.0 + seed, finished=50.0))
    runs, _ = load_runs([tmp_path])
    runs, warnings = select_runs(runs)
    assert sorted(runs.source[~runs.used].map(lambda p: Path(p).name)) == ["seed0-0", "seed0-2"]
    assert len(warnings) == 1 and "seed 0 appears in 3 runs" in warnings[0] and "seed0-1" in warnings[0]
    t = cell_table(runs)
    assert len(t) == 1 and (t.n.item(), t.seeds.item()) == (3, "0,1,2")
    assert t.acc_best_mean.item() == pytest.approx((85.0 + 87.0 + 88.0) / 3)  # the newest seed-0 run (t=300)

    # Without finished_at, the summary's modification time decides.
    other = tmp_path / "mtime"
    for name, acc, mtime in (("a", 70.0, 2_000_000_000), ("b", 75.0, 1_000_000_000)):
        write_run(other / name, digits_run("x", "sam", 0, acc))
        os.utime(other / name / "summary.json", (mtime, mtime))
    assert cell_table(load_runs([other])[0]).acc_best_mean.item() == 70.0

    out = tmp_path / "report"
    proc = run_cli([str(tmp_path / f"seed{s}") for s in (1, 2)] + [str(tmp_path / f"seed0-{i}") for i in range(3)]
                   + ["--out", str(out), "--no-plots"], module="esam.report")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("warning: seed 0 appears in 3 runs") == 1
    per_run = pd.read_csv(out / "runs.csv")
    assert per_run.used.sum() == 3 and len(per_run) == 5
    assert set(per_run[~per_run.used].left_out.str.contains("seed0-1")) == {True}
    md = (out / "table.md").read_text()
    assert "from 5 runs: 3 used, 2 left out" in md and "seed0-0" in md.split("Left out")[1]


def test_cells_split_by_experiment_hyperparameters_and_data(tmp_path):
    runs = runs_frame([digits_run("demo", "sgd", 0, 80.0)]
                      + [digits_run("digits", "sgd", s, 90.0 + s) for s in (0, 1, 2)]
                      + [digits_run("digits", "sgd", 0, 70.0, lr=0.1)]
                      + [digits_run("digits", "sgd", 0, 60.0, noise=0.2)])
    runs, warnings = select_runs(runs)
    assert warnings == [] and runs.used.all()  # same seed, different configurations: nothing repeated
    t = cell_table(runs)
    assert sorted(zip(t.experiment, t.n)) == [("demo", 1), ("digits", 1), ("digits", 1), ("digits", 3)]
    md = cells_markdown(t)
    # What tells the rows apart is printed: the experiment, the lr, the label noise.
    assert "| demo | digits (label_noise=0) | resnet_digits |" in md
    assert "| digits | digits (label_noise=0.2) |" in md and "| SGD | lr=0.1 |" in md


# -- accuracy at equal compute ------------------------------------------------------------------
def test_pareto_front_is_what_nothing_cheaper_beats():
    x = [1.0, 2.0, 2.0, 3.0, 4.0, math.nan, 0.5]
    y = [80.0, 85.0, 84.0, 85.0, 90.0, 99.0, 70.0]
    # (2, 84) loses to (2, 85); (3, 85) to (2, 85); NaN is never on it.
    assert pareto_front(x, y).tolist() == [True, True, False, False, True, False, True]


def budget_run(optimizer: str, seed: int, budget: float | None, acc: float, compute: float, wall: float,
               epochs: int = 4) -> dict:
    s = digits_run("equal_compute", optimizer, seed, acc, noise=0.2, budget=budget, compute_used=compute,
                   wall_time_s=wall)
    s["epochs"] = epochs
    return s


def test_equal_compute_table_and_pareto_plot(tmp_path):
    runs = [budget_run("sgd", s, 4, 80.0 + s, 4.0, 10.0 + s) for s in (0, 1)]
    runs += [budget_run("sam", s, 4, 83.0 + 2 * s, 4.0 + 0.02 * s, 11.0, epochs=2) for s in (0, 1)]
    runs += [budget_run("sgd", s, 8, 85.0 + s, 8.0, 20.0) for s in (0, 1)]
    runs += [budget_run("sam", 0, 8, 84.0, 8.0, 21.0)]
    runs += [budget_run("sam", s, None, 88.0, 8.0, 22.0) for s in (0, 1)]  # 4 epochs of SAM, no budget
    old = summary("digits", "resnet_digits", "sgd", 0, 70.0, 70.0, 1000.0, device="cpu", device_name="x86_64",
                  precision="fp32", num_threads=1, experiment="digits")  # before compute_used was logged
    for i, s in enumerate(runs + [old]):
        write_run(tmp_path / "runs" / f"r{i}", s)
    frame, curves = load_runs([tmp_path / "runs"])
    cells = cell_table(frame)
    assert len(cells) == 6
    ec = equal_compute_table(cells).set_index(["optimizer", "budget"])
    assert sorted(ec.index) == [("sam", 4.0), ("sam", 8.0), ("sgd", 4.0), ("sgd", 8.0)]
    sam4 = ec.loc[("sam", 4.0)]
    assert (sam4.n, sam4.acc_final_mean, sam4.acc_final_std) == (2, 84.0, pytest.approx(math.sqrt(2)))
    assert sam4.acc_final_vs_sgd == pytest.approx(84.0 - 80.5) and sam4.epochs_run_mean == 2.0
    assert sam4.compute_used_mean == pytest.approx(4.01) and sam4.wall_time_s_mean == 11.0
    assert ec.loc[("sam", 8.0)].acc_final_vs_sgd == pytest.approx(84.0 - 85.5)
    assert ec.loc[("sgd", 8.0)].acc_final_vs_sgd == 0.0

    md = equal_compute_markdown(equal_compute_table(cells))
    assert ("| equal_compute | digits | resnet_digits | AMD EPYC 7B13, fp32, 1 thr | 4 | SAM | rho=0.05 | 128 | 2 | "
            "4.01 ± 0.01 | 2.0 | 11.0 ± 0.0 | 84.00 ± 1.41 | 84.00 ± 1.41 | +3.50 |") in md
    # Budget 4 before budget 8, SGD before SAM within a budget.
    assert md.index("| 4 | SGD |") < md.index("| 4 | SAM |") < md.index("| 8 | SGD |") < md.index("| 8 | SAM |")

    files = write_report(frame, curves, tmp_path / "out")
    text = files["md"].read_text()
    epochs_part, compute_part = text.split("## At equal compute")
    assert "| equal_compute | digits | resnet_digits | AMD EPYC 7B13, fp32, 1 thr | SAM | rho=0.05 | 128 | 30 | 2 |" \
        in epochs_part and "| 4 | SAM |" not in epochs_part  # the budget-free SAM runs, and no budget run
    assert "| digits | digits | resnet_digits | x86_64, fp32, 1 thr | SGD |" in epochs_part  # old summary kept
    assert "| 8 | SAM | rho=0.05 | 128 | 1 | 8.00 |" in compute_part and "final vs SGD" in compute_part
    assert files["pareto"].stat().st_size > 1000
    table = pd.read_csv(files["csv"])
    assert set(table.columns) >= {"budget", "compute_used_mean", "compute_used_std", "wall_time_s_mean"}
    assert table.compute_used_mean.isna().sum() == 1  # only the old summary


def test_equal_compute_sweep_composes_every_registered_method_at_each_budget():
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from esam.optim.registry import METHODS
    from esam.train import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        params = compose("train", overrides=["+sweep=equal_compute"], return_hydra_config=True).hydra.sweeper.params
        # The jobs Hydra's basic sweeper launches for `python -m esam.train -m +sweep=equal_compute`.
        parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
        jobs = BasicSweeper.split_arguments(parser.parse_overrides([f"{k}={v}" for k, v in params.items()]), None)[0]
        options = sorted({dict(o.split("=", 1) for o in job)["optimizer"] for job in jobs})
        assert set(METHODS) <= set(options), set(METHODS) - set(options)
        assert len(jobs) == len(options) * 3 * 3
        for option in options:
            job = next(j for j in jobs if f"optimizer={option}" in j)
            cfg = compose("train", overrides=["+sweep=equal_compute", *job])
            assert cfg.optimizer.name in METHODS and cfg.experiment_name == "equal_compute"
            assert cfg.trainer.budget == 5.0 and cfg.dataset.label_noise > 0  # digits_noisy
        # Another dataset from the command line wins over the sweep's default.
        assert compose("train", overrides=["+sweep=equal_compute", "dataset=digits"]).dataset.label_noise == 0.0


def test_equal_compute_epochs_in_the_docs_follow_the_declared_costs():
    """"SAM about E/2, ESAM about E/1.7" (docs/usage.md and the sweep's header): each divisor is
    the method's declared cost relative to SGD's, as docs/methods.md lists it."""
    import re

    from esam.optim import METHODS

    for path in (REPO / "docs" / "usage.md", REPO / "conf" / "sweep" / "equal_compute.yaml"):
        text = " ".join(path.read_text().replace("#", " ").split())
        for method in ("SAM", "ESAM"):
            divisor, = re.findall(rf"\b{method} about E/([0-9]+(?:\.[0-9]+)?)", text)
            assert float(divisor) == pytest.approx(METHODS[method.lower()].relative_cost(), abs=0.05), (path, method)


@pytest.mark.slow  # starts a Python process: in `make test`, not `make test-fast`
def test_equal_compute_sweep_end_to_end(tmp_path):
    """A tiny `+sweep=equal_compute` (SGD and SAM, budget 1, one seed) and its report."""
    sweep = tmp_path / "multirun"
    proc = run_cli(["-m", "+sweep=equal_compute", "optimizer=sgd,sam", "trainer.budget=1", "seed=0",
                    "trainer.timing_warmup_steps=1", f"hydra.sweep.dir={sweep}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "report"
    proc = run_cli([str(sweep), "--out", str(out)], module="esam.report")
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pd.read_csv(out / "table.csv")
    assert table.budget.tolist() == [1.0, 1.0] and table.optimizer.tolist() == ["sgd", "sam"]
    assert table.compute_used_mean.tolist() == pytest.approx([1.0, 1.0], rel=0.05)
    assert (table.wall_time_s_mean > 0).all()
    md = (out / "table.md").read_text().split("## At equal compute")[1]
    assert "| equal_compute | digits | resnet_digits |" in md
    assert "| 1 | SGD |" in md and "| 1 | SAM |" in md and (out / "pareto.png").is_file()


# -- the command line and what the report says (issue 18 items 7, 9) ---------------------------
def test_title_names_the_methods_of_the_report(tmp_path):
    for i, method in enumerate(("looksam", "msam")):
        s = summary("digits", "m", "sgd", 0, 90.0, 90.0, 100.0)
        s.update(optimizer=method, method=method)
        write_run(tmp_path / f"r{i}", s)
    runs, curves = load_runs([tmp_path])
    md = write_report(runs, curves, tmp_path / "out", plots=False)["md"].read_text()
    assert md.startswith("# LOOKSAM vs MSAM\n") and "SGD vs SAM vs ESAM" not in md


def test_without_out_the_report_goes_to_outputs_not_the_committed_results(tmp_path):
    write_run(tmp_path / "runs" / "a", summary("digits", "m", "sgd", 0, 90.0, 90.0, 100.0))
    proc = run_cli(["runs", "--no-plots"], cwd=tmp_path, module="esam.report")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "outputs" / "table" / "table.md").is_file() and not (tmp_path / "results").exists()
    make = subprocess.run(["make", "-n", "--no-print-directory", "-o", "install", "table"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert make.returncode == 0, make.stderr
    line = next(x for x in make.stdout.splitlines() if "-m esam.report" in x)
    assert line.endswith("--out outputs/table"), line


def test_runs_inside_the_timing_warmup_say_why_there_is_no_throughput(tmp_path):
    write_run(tmp_path / "a", summary("digits", "m", "sgd", 0, 90.0, 90.0, None))
    runs, curves = load_runs([tmp_path])
    md = write_report(runs, curves, tmp_path / "out", plots=False)["md"].read_text()
    assert "nan" not in md.lower()
    assert "| 90.00 | 90.00 | – |" in md and "every step of those runs fell inside the timing warm-up" in md


def no_wandb_login_env(tmp_path: Path) -> dict[str, str]:
    """No wandb account or settings, and a server address nothing answers on."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "NETRC": str(home / ".netrc"),
            "WANDB_CONFIG_DIR": str(home / "wandb_config"), "WANDB_CACHE_DIR": str(home / "wandb_cache"),
            "WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_ERROR_REPORTING": "false"}


def test_wandb_project_without_a_login_is_one_sentence(tmp_path, capsys):
    proc = subprocess.run([sys.executable, "-m", "esam.report", "--wandb", "ent/proj"], cwd=REPO,
                          env=no_wandb_login_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "UsageError" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: wandb has no API key here, so --wandb ent/proj cannot read the server: run `wandb login` (or set "
        "WANDB_API_KEY), or report the run folders themselves (python -m esam.report outputs multirun), or the wandb "
        "runs logged offline with --wandb FOLDER (e.g. --wandb outputs)"]
    for args, says in ((["--wandb", "nofolder"], "--wandb nofolder: give ENTITY/PROJECT, or a folder of local wandb"),
                       (["--wandb", str(tmp_path), "--push"], "--push writes into runs on the wandb server"),
                       (["--wandb", str(tmp_path / "home")], "no wandb runs (run-*.wandb) below")):
        with pytest.raises(SystemExit) as exit_:
            report_main(args)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.startswith("error: " + says) and len(err.strip().splitlines()) == 1


# -- one colour per method (issue 18 item 8) ----------------------------------------------------
def test_every_registered_method_has_its_own_colour_far_from_the_others():
    import itertools

    from matplotlib.colors import to_rgb

    from esam.optim import METHODS
    from esam.report.colors import method_color, method_colors

    colors = method_colors()
    assert set(colors) == set(METHODS)
    dist = lambda a, b: math.dist(to_rgb(a), to_rgb(b))  # noqa: E731
    assert min(dist(colors[a], colors[b]) for a, b in itertools.combinations(colors, 2)) > 0.25
    assert dist(colors["sam"], colors["esam"]) > 0.8  # the paper's two: blue and red, not two blues
    assert method_color("not_registered") == method_color("not_registered")  # a stable spare


@pytest.fixture
def figures(monkeypatch):
    """The figures the plot functions make, kept open (they close them after saving)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kept: list = []
    monkeypatch.setattr(plt, "close", lambda fig=None: kept.append(fig))
    return kept


def labelled_colours(fig) -> list[tuple[int, str, str]]:
    """(panel, label, colour as hex) of every labelled point set and line in a figure."""
    from matplotlib.colors import to_hex

    out = []
    for i, ax in enumerate(fig.axes):
        for c in ax.containers:
            if hasattr(c, "lines") and not c.get_label().startswith("_"):
                out.append((i, c.get_label(), to_hex(c.lines[0].get_color())))
        out += [(i, line.get_label(), to_hex(line.get_color())) for line in ax.lines
                if not line.get_label().startswith("_") and line.get_label() != "Pareto front"]
    return out


def test_a_method_has_the_same_colour_in_every_panel_and_figure(tmp_path, figures):
    from esam.report.colors import method_color
    from esam.report.plots import plot_acc_vs_throughput, plot_curves, plot_pareto

    panels = {"digits": ("sgd", "esam"), "synthetic": ("sam", "looksam", "esam")}  # ESAM meets other methods
    for dataset, methods in panels.items():
        for method in methods:
            for seed in (0, 1):
                s = summary(dataset, "m", "sgd", seed, 99.0 + seed, 99.5 + 0.4 * seed, 100.0, compute_used=2.0,
                            wall_time_s=3.0)
                s.update(optimizer=method, method=method)
                write_run(tmp_path / dataset / f"{method}{seed}", s, accs=[90.0, 99.0 + seed])
    runs, curves = load_runs([tmp_path])
    cells = cell_table(runs)
    plot_acc_vs_throughput(cells, tmp_path / "a.png")
    plot_curves(curves, tmp_path / "c.png")
    plot_pareto(cells, tmp_path / "p.png")
    assert len(figures) == 3
    seen: dict[str, set[str]] = {}
    for fig in figures:
        found = labelled_colours(fig)
        assert len(found) >= 5, found
        for _, label, colour in found:
            seen.setdefault(label.split(" ")[0].lower(), set()).add(colour)
        for ax in fig.axes:
            if "accuracy" in ax.get_ylabel():
                assert ax.get_ylim()[1] <= 100.0  # 99.9 ± 0.57 would stretch it past 100
    assert seen == {m: {method_color(m)} for m in ("sgd", "sam", "esam", "looksam")}


def test_the_bench_bars_use_the_methods_report_colours(tmp_path, figures):
    from matplotlib.colors import to_hex

    from esam.bench.plots import plot_bars
    from esam.report.colors import method_color

    df = pd.DataFrame({"method": ["sgd", "sam", "esam_b04", "looksam"], "optimizer": ["sgd", "sam", "esam", "looksam"],
                       "extra_pct": [0.0, 100.0, 60.0, 20.0], "extra_pct_paired_q25": [0.0, 95.0, 55.0, 15.0],
                       "extra_pct_paired_q75": [0.0, 105.0, 65.0, 25.0], "extra_flops_pct": [0.0, 100.0, 55.0, 20.0],
                       "cost_model_extra_pct": [0.0, 100.0, 50.0, 20.0]})
    plot_bars(df, "sgd", "bench", tmp_path / "b.png")
    ax = figures[0].axes[0]
    from matplotlib.container import BarContainer

    measured = next(c for c in ax.containers if isinstance(c, BarContainer))  # one bar per method but the baseline
    faces = [to_hex(bar.get_facecolor()) for bar in measured.patches]
    assert faces == [method_color(m) for m in ("sam", "esam", "looksam")]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["sam", "esam_b04", "looksam"]
