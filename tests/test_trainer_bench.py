"""The trainer-vs-bench throughput check runs both sides and reports consistent ratios."""
from __future__ import annotations

import pytest

from esam.trainer_bench import compare, format_result


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
    text = format_result(res, "python -m esam.trainer_bench")
    assert "| bench: bare SGD steps |" in text and "% of bench SGD" in text
