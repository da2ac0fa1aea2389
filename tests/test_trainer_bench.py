"""The trainer-vs-bench throughput check runs both sides, reports consistent ratios, and writes
into a run folder of its own unless asked to publish."""
from __future__ import annotations

from pathlib import Path

import pytest

from esam.bench.pipeline import compare, format_result, main


def test_compare_reports_both_sides_and_their_ratio():
    res = compare(steps=2, rounds=2, precision="fp32", model="resnet_digits", batch_size=16)
    med = res["median"]
    assert len(res["rounds_detail"]) == 2
    for key in ("trainer_epoch_img_per_s", "trainer_step_img_per_s", "bench_sgd_img_per_s"):
        assert med[key] > 0
    assert res["epoch_pct_of_bench"] == pytest.approx(
        100 * med["trainer_epoch_img_per_s"] / med["bench_sgd_img_per_s"])
    # The epoch wall time holds the timed steps and more, so it can never be the faster of the two.
    for r in res["rounds_detail"]:
        assert r["trainer_epoch_img_per_s"] <= r["trainer_step_img_per_s"] * 1.0001
    text = format_result(res, "python -m esam.bench.pipeline")
    assert "| bench: bare SGD steps |" in text and "% of bench SGD" in text


def test_default_run_writes_outside_results_and_min_pct_fails_loudly(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["--steps", "1", "--rounds", "1", "--model", "resnet_digits", "--batch-size", "16",
            "--precision", "fp32", "--device", "cpu"]
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--min-pct", "1e9"])  # no trainer reaches a billion % of the bench
    assert exit_.value.code == 1
    assert not Path("results").exists()
    written = list(Path("outputs/bench").glob("*/trainer-vs-bench-resnet_digits-cpu-fp32.md"))
    assert len(written) == 1 and "python -m esam.bench.pipeline --steps 1" in written[0].read_text()
