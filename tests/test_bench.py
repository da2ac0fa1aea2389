"""esam.bench on a tiny CPU setup: files and columns, FLOP relations, cost model, grid mode,
methods from the optimizer config group, the progress window, where the files go.

Wall-clock numbers are never asserted (the machine may be busy); FLOP counts are
shape-based and deterministic, so those are.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir

from esam.bench import Bench, Method, MethodSpec, bench_rows, output_dir, report_tables, run
from esam.bench.runner import PUBLISH_DIR
from esam.errors import UserError
from esam.optim import ESAM, METHODS, MethodInfo, get_method
from esam.optim.base import SharpnessAwareOptimizer
from helpers import run_cli

CONF = str(Path(__file__).resolve().parents[1] / "conf")
TINY = [
    "model=resnet_digits", "dataset.image_size=8", "dataset.num_train=64", "dataset.num_test=16",
    "dataset.batch_size=16", "device=cpu", "precision=fp32", "steps=2", "repeats=2",
    "warmup_steps=1", "phase_steps=1", "num_batches=2", "num_threads=1",
    "flop_steps=2", "max_busy_repeats=0",
]


def bench_cfg(tmp_path: Path | None, *overrides: str):
    out = [f"results_dir={tmp_path}"] if tmp_path is not None else []
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("bench", overrides=[*TINY, *out, *overrides])


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    lines: list[str] = []
    res = run(bench_cfg(out), log=lines.append)
    return res, res["table"].set_index("method"), lines


def test_every_method_runs_and_files_have_the_columns(result):
    res, _, _ = result
    files = res["files"]
    assert files["csv"].name == f"resnet_digits-cpu-fp32-torch{torch.__version__.split('+')[0]}.csv"
    df = pd.read_csv(files["csv"])
    assert list(df.method) == ["sgd", "sam", "esam", "esam_swp", "esam_sds"]
    assert list(df.optimizer) == ["sgd", "sam", "esam", "esam", "esam"]  # registry keys
    for col in ["ms_median", "ms_mean", "ms_step", "stat", "ms_q25", "ms_q75", "ms_min", "ms_max", "images_per_s",
                "extra_pct", "gflops_step", "gflops_fwd", "gflops_bwd", "extra_flops_pct", "cost_model_extra_pct",
                "cost_units", "cost_measured", "cost_measured_extra_pct", "hparams",
                "beta", "gamma", "blocks_used", "extra_pct_paired_median", "phase_ms.first_pass.fwd",
                "phase_ms.second_pass.bwd", "phase_ms.select_forward.fwd", "precision", "channels_last",
                "batch_size", "torch"]:
        assert col in df.columns, col
    assert df.loc[df.method == "sgd", "extra_pct"].item() == 0.0
    # Only ESAM with gamma < 1 has a selection forward; SGD has no second pass.
    data = json.loads(files["json"].read_text())
    phases = data["phase_ms"]
    assert "select_forward.fwd" in phases["esam"] and "select_forward.fwd" not in phases["sam"]
    assert "second_pass.fwd" not in phases["sgd"]
    assert [len(blocks) for blocks in data["step_ms"].values()] == [2] * 5       # repeats
    assert all(len(b) == 2 for blocks in data["step_ms"].values() for b in blocks)  # steps
    assert data["optimizers"]["esam_swp"]["gamma"] == 1.0   # composed from conf/optimizer/esam_swp.yaml
    assert files["png"].stat().st_size > 0
    md = files["md"].read_text()
    assert "| method | stat | ms/step |" in md and "| esam_sds |" in md


def test_sam_counts_twice_the_flops_of_sgd(result):
    _, t, _ = result
    assert t.loc["sam", "gflops_step"] / t.loc["sgd", "gflops_step"] == pytest.approx(2.0, rel=0.05)
    assert t.loc["sam", "extra_flops_pct"] == pytest.approx(100.0, abs=5.0)


def test_esam_sample_selection_counts_fewer_flops_than_sam(result):
    _, t, _ = result
    assert t.loc["esam", "gflops_step"] < t.loc["sam", "gflops_step"]
    assert t.loc["esam_sds", "gflops_step"] < t.loc["sam", "gflops_step"]


def test_weight_perturbation_counts_fewer_backward_flops(result):
    _, t, _ = result
    assert t.loc["esam", "gflops_bwd"] < t.loc["esam_sds", "gflops_bwd"]   # beta 0.6 vs 1, same gamma
    assert t.loc["esam_swp", "gflops_bwd"] < t.loc["sam", "gflops_bwd"]    # beta 0.6 vs 1, gamma 1
    assert t.loc["esam_swp", "gflops_fwd"] == t.loc["sam", "gflops_fwd"]   # forwards untouched


def test_cost_model_comes_from_the_registry_and_sits_beside_the_measured_cost(result):
    _, t, _ = result
    assert t.loc["sgd", "cost_units"] == 3 and t.loc["sam", "cost_units"] == 6
    assert t.loc["esam", "cost_units"] == pytest.approx(5.1)       # 1 + 1.6 + 1 + 1.5: +70 %
    assert t.loc["esam_swp", "cost_units"] == pytest.approx(5.6)   # no selection forward
    assert t.loc["esam_sds", "cost_units"] == pytest.approx(5.5)
    assert t.loc["esam", "cost_model_extra_pct"] == pytest.approx(70.0)
    for name in t.index:
        assert t.loc[name, "cost_units"] == get_method(t.loc[name, "optimizer"]).expected_cost(
            beta=t.loc[name, "beta"], gamma=t.loc[name, "gamma"])
    # What the steps reported: exact for SGD/SAM and ESAM without SWP; SWP's draws vary around beta.
    assert t.loc["sgd", "cost_measured"] == 3 and t.loc["sam", "cost_measured"] == 6
    assert t.loc["esam_sds", "cost_measured"] == pytest.approx(5.5)
    assert 4 < t.loc["esam", "cost_measured"] < 5.5
    assert (t.stat == "median").all()  # none of these mixes steps of different passes


def test_warm_up_and_flop_counting_print_progress(result):
    _, _, lines = result
    assert "flops: sgd step 1/2" in "\n".join(lines) and "flops: esam_sds step 2/2" in "\n".join(lines)
    assert any(line.startswith("warm-up: step 1/1") for line in lines)
    # They come before the first timed repeat, so a slow machine shows life from the start.
    first_repeat = next(i for i, line in enumerate(lines) if line.startswith("repeat 1/"))
    assert all(i < first_repeat for i, line in enumerate(lines) if line.startswith(("flops:", "warm-up:")))


def test_swp_draws_are_fixed_by_the_seed(tmp_path):
    def esam_swp(seed: int):
        bench = Bench(bench_cfg(tmp_path, f"seed={seed}", "methods=[sgd,esam_swp]"))
        bench.count_flops(log=lambda _: None)
        return bench.methods[1]

    a, b = esam_swp(3), esam_swp(3)
    assert a.opt.generator.initial_seed() == 3
    assert a.flops == b.flops  # same tensors drawn, so the same backward FLOPs


def test_grid_mode_writes_its_csv_and_heatmap(tmp_path):
    cfg = bench_cfg(tmp_path, "mode=grid", "grid.betas=[0.5,1.0]", "grid.gammas=[0.5,1.0]",
                    "steps=1", "repeats=1", "phase_steps=0")
    files = run(cfg, log=lambda _: None)["files"]
    assert files["csv"].name.endswith("-grid.csv")
    df = pd.read_csv(files["csv"])
    esam = df[df.optimizer == "esam"]
    assert sorted(zip(esam.beta, esam.gamma)) == [(0.5, 0.5), (0.5, 1.0), (1.0, 0.5), (1.0, 1.0)]
    assert list(df.method[df.optimizer == "sgd"]) == ["sgd"]
    # beta = gamma = 1 is exactly SAM: twice SGD's FLOPs.
    assert esam.set_index(["beta", "gamma"]).loc[(1.0, 1.0), "extra_flops_pct"] == pytest.approx(100, abs=5)
    assert files["png"].stat().st_size > 0
    assert "| beta | gamma=0.5 | gamma=1 |" in files["md"].read_text()


def test_methods_are_optimizer_options_and_variants_override_them(tmp_path):
    cfg = bench_cfg(tmp_path, "+variants.esam_b04={optimizer:esam,beta:0.4,gamma:0.3}",
                    "+variants.sam_adamw={optimizer:sam,base:adamw,rho:0.1}", "+common.lr=0.2",
                    "methods=[sgd,esam_b04,sam_adamw,esam_swp]")
    bench = Bench(cfg)
    sgd, esam, sam, swp = (m.opt for m in bench.methods)
    assert isinstance(esam, ESAM) and (esam.beta, esam.gamma) == (0.4, 0.3)
    assert isinstance(sam.base_optimizer, torch.optim.AdamW) and sam.param_groups[0]["rho"] == 0.1
    assert isinstance(sgd.base_optimizer, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.9
    assert all(o.param_groups[0]["lr"] == 0.2 for o in (sgd, esam, sam, swp))  # common reaches every method
    assert (swp.beta, swp.gamma) == (0.6, 1.0)  # conf/optimizer/esam_swp.yaml, not a copy in bench.yaml
    assert [m.units for m in bench.methods] == pytest.approx([3.0, 1 + 1.4 + 1 + 0.9, 6.0, 5.6])


def test_m_sharpness_variants_are_declared():
    cfg = bench_cfg(None, "methods=[sgd,sam_m64,esam_m64]", "dataset.batch_size=128")
    from esam.bench.methods import method_specs

    specs = {s.name: s for s in method_specs(cfg)}
    assert specs["sam_m64"].kwargs["m"] == 64 and specs["esam_m64"].kwargs["m"] == 64


@pytest.mark.parametrize("overrides, words", [
    (["methods=[sgd,adam_sam]"], "adam_sam"),
    (["methods=[sam,esam]"], "baseline"),
    (["precision=fp16"], "fp16"),
    (["steps=0"], "steps"),
    (["max_busy_repeats=-1"], "max_busy_repeats=-1 must be >= 0"),
    (["+variants.bad={optimizer:sam,beta:0.4}", "methods=[sgd,bad]"], "variants.bad: 'beta'"),
    (["+variants.nobase={beta:0.4}", "methods=[sgd,nobase]"], "variants.nobase has no 'optimizer'"),
    (["window.end=1.5"], "window"),
    (["publish=true", "results_dir=/tmp/x"], "publish"),
])
def test_bad_configs_fail_with_one_sentence(tmp_path, overrides, words):
    cfg = bench_cfg(None, *overrides)
    with pytest.raises(UserError, match=words):
        output_dir(cfg)
        Bench(cfg)


def test_output_goes_to_the_run_folder_unless_published(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert output_dir(bench_cfg(None)).parent == Path("outputs/bench")       # a fresh folder of its own
    assert output_dir(bench_cfg(None, "publish=true")) == Path(PUBLISH_DIR)
    assert output_dir(bench_cfg(None, "results_dir=elsewhere")) == Path("elsewhere")
    files = run(bench_cfg(None, "publish=true", "methods=[sgd]", "repeats=1", "plot=false"),
                log=lambda _: None)["files"]
    assert files["csv"].resolve().parent == (tmp_path / "results" / "bench").resolve()


@pytest.mark.slow  # starts a Python process: in `make test`, not `make test-fast`
def test_cli_writes_into_its_run_folder_and_never_into_results(tmp_path):
    """`make bench` once replaced the committed results/bench/ files; a default run must not."""
    proc = run_cli([*TINY, "methods=[sgd,sam]", "repeats=1", "steps=1", "phase_steps=0", "flop_steps=1",
                    "plot=false"], cwd=tmp_path, module="esam.bench", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (tmp_path / "results").exists()
    written = list((tmp_path / "outputs" / "bench").glob("*/resnet_digits-cpu-fp32-*.csv"))
    assert len(written) == 1 and list(pd.read_csv(written[0]).method) == ["sgd", "sam"]
    assert "flops: sam step 1/1" in proc.stdout and "warm-up: step 1/1" in proc.stdout


@pytest.mark.slow  # starts a Python process: in `make test`, not `make test-fast`
def test_cli_explains_a_bad_method_in_one_sentence(tmp_path):
    proc = run_cli(["methods=[sgd,nope]", f"hydra.run.dir={tmp_path}/hydra"], cwd=tmp_path,
                   module="esam.bench", timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: methods: 'nope' is not an optimizer option; allowed: ")
    assert "Traceback" not in proc.stderr


class _LatePhase(SharpnessAwareOptimizer):
    """A toy per-step method: a plain step before half of training, a two-pass one after."""

    def step(self, closure, *, grad_scaler=None):
        self.seen = getattr(self, "seen", []) + [self.progress]
        self.zero_grad()
        losses = closure()
        losses.mean().backward()
        if self.progress >= 0.5:
            closure().mean().backward()  # a second forward/backward: the 'sharpness-aware' step
        self.base_optimizer.step()
        self.last_cost = 6.0 if self.progress >= 0.5 else 3.0
        return losses.detach()


def test_methods_that_vary_by_step_are_timed_over_the_window_and_reported_by_their_mean(tmp_path, monkeypatch):
    monkeypatch.setitem(METHODS, "toy_late", MethodInfo("toy_late", _LatePhase, "a test", lambda **_: 4.5))
    bench = Bench(bench_cfg(tmp_path, "methods=[sgd]", "repeats=4", "steps=2", "window.epochs=10"))
    model = bench.methods[0].model
    late = _LatePhase(model.parameters(), "sgd", lr=0.01)
    bench.methods.append(Method(MethodSpec("late", {}, "toy_late", {}), model, late))
    bench.time_steps(log=lambda _: None)
    # 8 timed steps spread evenly over progress 0..1, as opt.set_progress told the method.
    assert late.seen == pytest.approx([i / 7 for i in range(8)])
    df = bench_rows(bench, {"device": "cpu", "torch": "x"}).set_index("method")
    assert df.loc["late", "cost_measured"] == 4.5 and df.loc["late", "cost_units"] == 4.5
    assert df.loc["late", "cost_measured_extra_pct"] == pytest.approx(50.0)
    assert df.loc["late", "stat"] == "mean" and df.loc["sgd", "stat"] == "median"
    assert df.loc["late", "ms_step"] == pytest.approx(df.loc["late", "ms_mean"])
    assert math.isnan(df.loc["late", "beta"])


def test_every_registered_method_runs_in_the_bench(tmp_path):
    """A new method (module + conf/optimizer file) gets the bench for free: FLOPs, time, both costs.
    SAF/MESA key their memory by dataset index, so the bench's closures carry sample ids too."""
    from esam.bench import registered_options

    names = registered_options()
    cfg = bench_cfg(tmp_path, f"methods=[{','.join(names)}]", "repeats=1", "steps=1", "flop_steps=1",
                    "phase_steps=0", "warmup_steps=0", "plot=false")
    df = run(cfg, log=lambda _: None)["table"].set_index("method")
    assert list(df.index) == names
    assert (df.gflops_step > 0).all() and (df.ms_step > 0).all() and (df.cost_measured > 0).all()
    for name in names:
        assert df.loc[name, "cost_units"] > 0 and math.isfinite(df.loc[name, "cost_model_extra_pct"]), name


# -- issue 18: the quick preset, the time left, bounded waiting for a quiet machine ---------------
class ScriptedLoad:
    """A busy detector that reads other processes' CPU share from a script, one value per block
    (then 0.0: quiet), so which repeats are busy is fixed whatever the machine is doing."""

    def __init__(self, shares: list[float]) -> None:
        self.shares = list(shares)
        self.calls = 0

    def __call__(self) -> "ScriptedLoad._Meter":
        share = self.shares[self.calls] if self.calls < len(self.shares) else 0.0
        self.calls += 1
        return self._Meter(share)

    class _Meter:
        def __init__(self, share: float) -> None:
            self._share = share

        def share(self) -> float:
            return self._share


QUIET = ScriptedLoad([])  # never busy (calls beyond the script read 0.0)


def test_quick_preset_composes_over_the_defaults_and_the_command_line_still_wins():
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        quick = compose("bench", overrides=["preset=quick"])
        mine = compose("bench", overrides=["preset=quick", "repeats=5", "dataset.batch_size=128"])
    assert quick.model.name == "resnet18" and quick.dataset.batch_size == 32
    assert list(quick.methods) == ["sgd", "sam", "esam", "looksam", "msam"]
    assert (quick.repeats, quick.steps, quick.warmup_steps, quick.flop_steps, quick.phase_steps) == (3, 2, 2, 1, 0)
    assert quick.max_busy_repeats == 1 and quick.tag == "quick"
    assert (mine.repeats, mine.dataset.batch_size, mine.flop_steps) == (5, 128, 1)


def test_quick_preset_runs_end_to_end_and_prints_ratios_and_the_time_left(tmp_path):
    """preset=quick on a tiny model: every method side by side, ratios in the table, an estimate."""
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("bench", overrides=["preset=quick", "model=resnet_digits", "dataset.image_size=8",
                                          "dataset.num_train=64", "device=cpu", "precision=fp32",
                                          "num_threads=1", "plot=false", f"results_dir={tmp_path}"])
    lines: list[str] = []
    res = run(cfg, log=lines.append, load_meter=QUIET)
    assert res["files"]["csv"].name.endswith("-quick.csv")  # never taken for a full run's files
    df = pd.read_csv(res["files"]["csv"]).set_index("method")
    assert list(df.index) == ["sgd", "sam", "esam", "looksam", "msam"]
    assert (df.batch_size == 32).all() and (df.blocks_used == 3).all() and (df.blocks == 3).all()
    assert not df.under_load.any()
    assert df.loc["sam", "extra_flops_pct"] == pytest.approx(100.0, abs=5.0)  # measured side by side
    text = "\n".join(lines)
    assert "extra %" in text and "cost model %" in text and "UNDER LOAD" not in text
    # The estimate comes right after the warm-up, before the FLOP counting; every repeat says what is left.
    first_flops = next(i for i, line in enumerate(lines) if line.startswith("flops:"))
    estimate = next(i for i, line in enumerate(lines) if line.startswith("estimate: about "))
    assert lines[estimate - 1].startswith("warm-up: step 2/2") and estimate < first_flops
    assert " left (FLOP counting " in lines[estimate] and ", timing " in lines[estimate]
    repeats = [line for line in lines if line.startswith("repeat ")]
    assert len(repeats) == 3 and all(" left" in line for line in repeats)


def test_eta_is_step_times_times_steps_left():
    from esam.bench.eta import Eta, duration, duration_span

    eta = Eta(recent=3)
    assert math.isnan(eta.seconds({"sgd": 1}))               # nothing measured yet
    eta.plain("sgd", 0.1)
    eta.plain("sam", 9.0)                                     # a slow first step, then three quick ones
    for s in (0.2, 0.2, 0.2):
        eta.plain("sam", s)
    assert eta.step_s("sam") == pytest.approx(0.2)            # median of the last 3
    assert eta.seconds({"sgd": 4, "sam": 4}) == pytest.approx(1.2)
    assert eta.seconds({"sgd": 0, "other": 0}) == 0.0         # no steps left: no need to have measured them
    assert eta.seconds({}, {"sam": 2}) == pytest.approx(0.4)  # counting overhead 1 until measured
    eta.counted("sgd", 0.3)                                   # a counted step took 3 plain ones
    assert eta.overhead == pytest.approx(3.0)
    assert eta.seconds({"sgd": 1}, {"sam": 2}) == pytest.approx(0.1 + 2 * 0.2 * 3)
    eta.counted("new", 0.5)                                   # no plain step yet: the counted one stands in
    assert eta.step_s("new") == 0.5
    assert [duration(s) for s in (0.2, 40, 150, 7200)] == ["<1 s", "40 s", "2.5 min", "2.0 h"]
    assert [duration_span(*s) for s in ((24, 30), (40, 40.2), (50, 150))] == ["24-30 s", "40 s", "50 s-2.5 min"]


def test_estimate_line_adds_up_the_stages_left(tmp_path):
    bench = Bench(bench_cfg(tmp_path, "methods=[sgd,sam]", "repeats=2", "steps=2", "warmup_steps=1",
                            "flop_steps=2", "phase_steps=1", "max_busy_repeats=1"))
    assert bench.estimate() == "estimate: after the first measured steps (warmup_steps=0)"
    bench.eta.plain("sgd", 1.0)
    bench.eta.plain("sam", 2.0)
    # Per method: 1 warm-up, 2 counted, 2 x 2 timed, 1 phase step; busy repeats may add 1 x 2 steps.
    assert bench.steps_left() == {"warm-up": 1, "timing": 4, "phase pass": 1, "again": 2}
    assert bench.estimate() == ("estimate: about 24-30 s left (FLOP counting 6 s, warm-up 3 s, timing 12 s, "
                                "phase pass 3 s, up to 6 s more if other processes keep the CPU busy "
                                "(max_busy_repeats=1)), from the measured step times")


def _scripted_times(bench: Bench, seconds: dict[str, list[float]]):
    """Run each step for real but report the scripted seconds: the figures become exact."""
    left = {name: list(s) for name, s in seconds.items()}

    def timed_step(m, progress=None):
        bench.step(m, progress)
        return left[m.name].pop(0)

    bench.timed_step = timed_step


def test_a_busy_repeat_is_run_again_for_the_same_stretch_and_left_out_of_the_figures(tmp_path, monkeypatch):
    monkeypatch.setitem(METHODS, "toy_late", MethodInfo("toy_late", _LatePhase, "a test", lambda **_: 4.5))
    # Blocks in call order: repeat 1 (sgd busy), again (quiet), repeat 2 (quiet), each [sgd, late] rotated.
    bench = Bench(bench_cfg(tmp_path, "methods=[sgd]", "repeats=2", "steps=1", "max_busy_repeats=3"),
                  load_meter=ScriptedLoad([0.9, 0.0, 0.0, 0.0, 0.0, 0.0]))
    model = bench.methods[0].model
    late = _LatePhase(model.parameters(), "sgd", lr=0.01)
    bench.methods.append(Method(MethodSpec("late", {}, "toy_late", {}), model, late))
    _scripted_times(bench, {"sgd": [5.0, 1.0, 1.0], "late": [2.0, 2.0, 2.0]})
    lines: list[str] = []
    bench.time_steps(log=lines.append)
    assert bench.dropped == [0] and bench.kept == [1, 2]
    assert late.seen == pytest.approx([0.0, 0.0, 1.0])   # the repeat run again covers progress 0 again
    assert lines[0].startswith("repeat 1/2: sgd 5000ms*  late 2000ms")
    assert "left out and run again, 1/3 of max_busy_repeats" in lines[0]
    assert lines[1].startswith("repeat 1/2 (again): ") and lines[2].startswith("repeat 2/2: ")
    assert not bench.under_load
    df = bench_rows(bench, {"device": "cpu", "torch": "x"}).set_index("method")
    assert df.loc["sgd", "ms_step"] == pytest.approx(1000.0)  # the busy 5 s block is left out
    assert df.loc["late", "extra_pct"] == pytest.approx(100.0)
    assert list(df.blocks_used) == [2, 2] and list(df.blocks) == [3, 3] and not df.under_load.any()


def test_after_max_busy_repeats_the_bench_stops_waiting_and_flags_the_figures(tmp_path):
    """A machine that never goes quiet: 2 repeats run again, then every repeat counts, flagged."""
    cfg = bench_cfg(tmp_path, "methods=[sgd,sam]", "repeats=3", "steps=1", "max_busy_repeats=2", "plot=false")
    lines: list[str] = []
    # sam's block is busy every time; the order alternates [sgd, sam], [sam, sgd], ...; then the phase pass.
    shares = [0.0, 0.8, 0.8, 0.0, 0.0, 0.8, 0.8, 0.0, 0.0, 0.8, 0.0]
    res = run(cfg, log=lines.append, load_meter=ScriptedLoad(shares))
    repeats = [line for line in lines if line.startswith("repeat ")]
    assert len(repeats) == 5                                  # 3 + 2 run again, no more
    assert all("run again" in line for line in repeats[:2])
    assert all("kept, taken under load: max_busy_repeats=2 reached" in line for line in repeats[2:])
    df = pd.read_csv(res["files"]["csv"]).set_index("method")
    assert df.under_load.all()                                # every ratio involves the busy blocks
    assert df.loc["sam", "blocks_under_load"] == 3 and df.loc["sgd", "blocks_under_load"] == 0
    assert list(df.blocks_used) == [3, 3] and list(df.blocks) == [5, 5]
    data = json.loads(res["files"]["json"].read_text())
    assert data["load"]["under_load"] is True and data["env"]["under_load"] is True
    assert data["load"]["kept_repeats"] == [2, 3, 4] and data["load"]["dropped_repeats"] == [0, 1]
    assert data["load"]["note"].startswith("UNDER LOAD: other processes used more than 10% of the CPU during "
                                           "3 of the 3 kept repeats (the bench stopped waiting after "
                                           "max_busy_repeats=2 busy ones")
    md = res["files"]["md"].read_text()
    assert "UNDER LOAD" in md.splitlines()[0]                 # the title
    assert f"**{data['load']['note']}**" in md and "| busy blocks |" in md
    assert f"warning: {data['load']['note']}" in lines


def test_max_busy_repeats_zero_never_waits(tmp_path):
    bench = Bench(bench_cfg(tmp_path, "methods=[sgd]", "repeats=2", "steps=1", "max_busy_repeats=0"),
                  load_meter=ScriptedLoad([1.0, 1.0]))
    bench.time_steps(log=lambda _: None)
    assert bench.kept == [0, 1] and bench.dropped == [] and bench.under_load


@pytest.mark.parametrize("flop_steps, noted", [(1, True), (5, False)])
def test_too_few_flop_steps_for_lookSAMs_cycle_are_said_beside_the_table(tmp_path, flop_steps, noted):
    """Quick runs count one step: for LookSAM (a full step every k=5) that is one cheap step, not its mean."""
    bench = Bench(bench_cfg(tmp_path, "methods=[sgd,looksam]", "warmup_steps=1", f"flop_steps={flop_steps}",
                            "repeats=2", "steps=3", "phase_steps=0"), load_meter=QUIET)
    bench.warm_up(log=lambda _: None)
    bench.count_flops(log=lambda _: None)
    bench.time_steps(log=lambda _: None)
    looksam = bench.methods[1]
    assert looksam.mixed_steps                                # its timed window holds a full step
    caption = report_tables(bench_rows(bench, {"device": "cpu", "torch": "x"}), bench)[0][0]
    assert looksam.flops_off_mix is noted and not bench.methods[0].flops_off_mix
    assert ("FLOPs extra % of looksam counts 1 step(s) that ran another mix of passes than the timed ones" in caption) \
        is noted
