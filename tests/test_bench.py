"""esam.bench on a tiny CPU setup: files and columns, FLOP relations, cost model, grid mode.

Wall-clock numbers are never asserted (the machine may be busy); FLOP counts are
shape-based and deterministic, so those are.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir

from esam.bench import Bench, cost_units, run
from esam.errors import UserError
from esam.optim import ESAM, SAM, SGD

CONF = str(Path(__file__).resolve().parents[1] / "conf")
TINY = [
    "model=resnet_digits", "dataset.image_size=8", "dataset.num_train=64", "dataset.num_test=16",
    "dataset.batch_size=16", "device=cpu", "precision=fp32", "steps=2", "repeats=2",
    "warmup_steps=1", "phase_steps=1", "num_batches=2", "num_threads=1",
    "flop_steps=2",
]


def bench_cfg(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("bench", overrides=[*TINY, f"results_dir={tmp_path}", *overrides])


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    res = run(bench_cfg(out), log=lambda _: None)
    return res, res["table"].set_index("method")


def test_every_method_runs_and_files_have_the_columns(result):
    res, _ = result
    files = res["files"]
    assert files["csv"].name == f"resnet_digits-cpu-fp32-torch{torch.__version__.split('+')[0]}.csv"
    df = pd.read_csv(files["csv"])
    assert list(df.method) == ["sgd", "sam", "esam", "esam_swp", "esam_sds"]
    for col in ["ms_median", "ms_q25", "ms_q75", "ms_min", "ms_max", "images_per_s", "extra_pct",
                "gflops_step", "gflops_fwd", "gflops_bwd", "extra_flops_pct", "cost_model_extra_pct",
                "beta", "gamma", "blocks_used", "extra_pct_paired_median", "phase_ms.first_pass.fwd", "phase_ms.second_pass.bwd",
                "phase_ms.select_forward.fwd", "precision", "channels_last", "batch_size", "torch"]:
        assert col in df.columns, col
    assert df.loc[df.method == "sgd", "extra_pct"].item() == 0.0
    # Only ESAM with gamma < 1 has a selection forward; SGD has no second pass.
    phases = json.loads(files["json"].read_text())["phase_ms"]
    assert "select_forward.fwd" in phases["esam"] and "select_forward.fwd" not in phases["sam"]
    assert "second_pass.fwd" not in phases["sgd"]
    data = json.loads(files["json"].read_text())
    assert [len(blocks) for blocks in data["step_ms"].values()] == [2] * 5       # repeats
    assert all(len(b) == 2 for blocks in data["step_ms"].values() for b in blocks)  # steps
    assert files["png"].stat().st_size > 0
    md = files["md"].read_text()
    assert "| method | ms/step |" in md and "| esam_sds |" in md


def test_sam_counts_twice_the_flops_of_sgd(result):
    _, t = result
    assert t.loc["sam", "gflops_step"] / t.loc["sgd", "gflops_step"] == pytest.approx(2.0, rel=0.05)
    assert t.loc["sam", "extra_flops_pct"] == pytest.approx(100.0, abs=5.0)


def test_esam_sample_selection_counts_fewer_flops_than_sam(result):
    _, t = result
    assert t.loc["esam", "gflops_step"] < t.loc["sam", "gflops_step"]
    assert t.loc["esam_sds", "gflops_step"] < t.loc["sam", "gflops_step"]


def test_weight_perturbation_counts_fewer_backward_flops(result):
    _, t = result
    assert t.loc["esam", "gflops_bwd"] < t.loc["esam_sds", "gflops_bwd"]   # beta 0.6 vs 1, same gamma
    assert t.loc["esam_swp", "gflops_bwd"] < t.loc["sam", "gflops_bwd"]    # beta 0.6 vs 1, gamma 1
    assert t.loc["esam_swp", "gflops_fwd"] == t.loc["sam", "gflops_fwd"]   # forwards untouched


def test_swp_draws_are_fixed_by_the_seed(tmp_path):
    def esam_swp(seed: int):
        bench = Bench(bench_cfg(tmp_path, f"seed={seed}", "methods=[sgd,esam_swp]"))
        bench.count_flops()
        return bench.methods[1]

    a, b = esam_swp(3), esam_swp(3)
    assert a.opt.generator.initial_seed() == 3
    assert a.flops == b.flops  # same tensors drawn, so the same backward FLOPs


def test_cost_model_matches_the_docstring():
    p = [torch.nn.Parameter(torch.zeros(2))]
    assert cost_units(SGD(p, lr=0.1)) == 3
    assert cost_units(SAM(p, lr=0.1)) == 6
    assert cost_units(ESAM(p, lr=0.1, beta=0.6, gamma=0.5)) == pytest.approx(5.1)   # +70 %
    assert cost_units(ESAM(p, lr=0.1, beta=0.6, gamma=1.0)) == pytest.approx(5.6)   # no selection forward
    assert cost_units(ESAM(p, lr=0.1, beta=1.0, gamma=0.5)) == pytest.approx(5.5)


def test_grid_mode_writes_its_csv_and_heatmap(tmp_path):
    cfg = bench_cfg(tmp_path, "mode=grid", "grid.betas=[0.5,1.0]", "grid.gammas=[0.5,1.0]",
                    "steps=1", "repeats=1", "phase_steps=0")
    files = run(cfg, log=lambda _: None)["files"]
    assert files["csv"].name.endswith("-grid.csv")
    df = pd.read_csv(files["csv"])
    esam = df[df.optimizer == "ESAM"]
    assert sorted(zip(esam.beta, esam.gamma)) == [(0.5, 0.5), (0.5, 1.0), (1.0, 0.5), (1.0, 1.0)]
    assert list(df.method[df.optimizer == "SGD"]) == ["sgd"]
    # beta = gamma = 1 is exactly SAM: twice SGD's FLOPs.
    assert esam.set_index(["beta", "gamma"]).loc[(1.0, 1.0), "extra_flops_pct"] == pytest.approx(100, abs=5)
    assert files["png"].stat().st_size > 0
    assert "| beta | gamma=0.5 | gamma=1 |" in files["md"].read_text()


def test_methods_can_be_added_from_the_config(tmp_path):
    cfg = bench_cfg(tmp_path, "+method_defs.esam_b04={_target_:esam.optim.ESAM,beta:0.4,gamma:0.3}",
                    "methods=[sgd,esam_b04]")
    opt = Bench(cfg).methods[1].opt
    assert isinstance(opt, ESAM) and (opt.beta, opt.gamma) == (0.4, 0.3)


@pytest.mark.parametrize("overrides, words", [
    (["methods=[sgd,adam_sam]"], "adam_sam"),
    (["methods=[sam,esam]"], "baseline"),
    (["precision=fp16"], "fp16"),
    (["steps=0"], "steps"),
])
def test_bad_configs_fail_with_one_sentence(tmp_path, overrides, words):
    with pytest.raises(UserError, match=words):
        Bench(bench_cfg(tmp_path, *overrides))


def test_cli_explains_a_bad_method_in_one_sentence(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "esam.bench", "methods=[sgd,nope]", f"results_dir={tmp_path}",
                           f"hydra.run.dir={tmp_path}/hydra"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: methods ['nope'] are not in method_defs")
    assert "Traceback" not in proc.stderr
