"""trainer.budget: equal compute, not equal epochs.

What a user relies on: ``python -m esam.train dataset=digits optimizer=sam trainer.budget=2``
takes about half the steps of the same run with ``optimizer=sgd``, and both report
``compute_used`` within 5% of 2.0 (here on 1437 digits in batches of 128: 12 steps an epoch).
"""
from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

from helpers import compose_cfg
from esam.train import run

FP32 = ["dataset=digits", "dataset.batch_size=128", "trainer.precision=fp32", "trainer.device=cpu", "trainer.num_threads=1",
        "trainer.progress=false", "trainer.timing_warmup_steps=1", "trainer.limit_test_batches=1"]


@pytest.fixture(autouse=True)
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def budget_run(tmp_path, method: str, *extra: str) -> tuple[dict, list[dict]]:
    run_dir = tmp_path / method
    with contextlib.redirect_stdout(io.StringIO()):
        summary = run(compose_cfg([*FP32, f"optimizer={method}", "trainer.budget=2", *extra]), run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert json.loads((run_dir / "summary.json").read_text()) == json.loads(json.dumps(summary))
    return summary, rows


def test_sam_gets_half_the_steps_of_sgd_at_the_same_compute(tmp_path):
    sgd, sgd_rows = budget_run(tmp_path, "sgd")
    sam, sam_rows = budget_run(tmp_path, "sam")
    assert sgd["train_steps"] == 24 and sam["train_steps"] == 12  # 2 epochs vs 1
    assert sam["train_steps"] == pytest.approx(sgd["train_steps"] / 2, rel=0.1)
    for s in (sgd, sam):
        assert s["compute_used"] == pytest.approx(2.0, rel=0.05) and s["budget"] == 2.0
        assert s["wall_time_s"] > 0
    # Per epoch, cumulative; the lr schedule spans each run's own length (cosine per epoch).
    assert [r["compute_used"] for r in sgd_rows] == pytest.approx([1.0, 2.0])
    assert [r["lr"] for r in sgd_rows] == pytest.approx([0.05, 0.025])
    assert [r["compute_used"] for r in sam_rows] == pytest.approx([2.0]) and sam_rows[0]["lr"] == 0.05
    assert sgd_rows[1]["wall_time_s"] == pytest.approx(sgd_rows[0]["wall_time_s"] + sgd_rows[1]["epoch_time_s"])


def test_esam_stops_within_half_a_step_of_the_budget(tmp_path):
    """ESAM's measured cost per step varies with its random parameter draw; the run stops at the
    step boundary nearest the budget, with a partial last epoch."""
    esam, rows = budget_run(tmp_path, "esam")
    half_step = 0.5 * 5.1 * 128 / (3 * 1437)  # ESAM(0.6, 0.5) at batch 128, in SGD epochs
    assert abs(esam["compute_used"] - 2.0) <= half_step + 0.01
    assert [r["epoch"] for r in rows] == [1, 2] and rows[1]["train_steps"] < 12
    assert esam["train_steps"] == pytest.approx(24 / 1.7, abs=1.5)
