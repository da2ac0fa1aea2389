"""CUDA paths that the CPU suite cannot reach: fp16 with GradScaler through SAM/ESAM, bf16
autocast, channels_last, a short training run and a resume on the GPU.

Marked ``cuda`` and skipped without a GPU; ``scripts/gpu_check.sh`` runs them with ``-m cuda``.
GPU kernels are not bitwise reproducible across runs (cuDNN picks algorithms, atomics in some
backward kernels), so comparisons here use tolerances, never equality.
"""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from helpers import compose_cfg
from esam.models import build_model
from esam.optim import SAM, build_optimizer, make_closure
from esam.runtime import autocast_context

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEVICE = torch.device("cuda")
TRAIN = ["dataset=synthetic", "model=resnet_digits", "dataset.image_size=8", "dataset.num_train=96",
         "dataset.num_test=32", "dataset.batch_size=16", "trainer.progress=false", "trainer.device=cuda",
         "trainer.timing_warmup_steps=1", "logger=none"]


def tiny(method: str, channels_last: bool = False, **kwargs):
    """resnet_digits on the GPU, its optimizer, and one 8x8 batch of 32."""
    torch.manual_seed(0)
    model = build_model("resnet_digits", num_classes=10, in_channels=3).to(DEVICE).train()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 3, 8, 8, generator=g).to(DEVICE), torch.randint(0, 10, (32,), generator=g).to(DEVICE)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    opt = build_optimizer(method, model.parameters(), base_optimizer="sgd", lr=0.05, momentum=0.9,
                          model=model, seed=0, **kwargs)
    return model, opt, x, y


def weights(model) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten() for p in model.parameters()])


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def train(model, opt, x, y, precision: str, steps: int = 3, scaler=None, channels_last: bool = False):
    for _ in range(steps):
        closure = make_closure(model, x, y, autocast=lambda: autocast_context(precision, DEVICE),
                               channels_last=channels_last)
        losses = opt.step(closure, grad_scaler=scaler)
        assert torch.isfinite(losses).all()
    torch.cuda.synchronize()
    return closure


@pytest.mark.parametrize("method", ["sam", "esam"])
def test_fp16_with_grad_scaler_trains_and_stays_finite(method):
    model, opt, x, y = tiny(method)
    start = weights(model)
    scaler = torch.amp.GradScaler("cuda")
    closure = train(model, opt, x, y, "fp16", scaler=scaler)
    assert closure.first_logits.dtype == torch.float16
    w = weights(model)
    assert torch.isfinite(w).all() and not torch.equal(w, start)
    assert 0 < scaler.get_scale() < float("inf")
    if method == "sam":  # same update as fp32 up to fp16 rounding (ESAM's selection may differ)
        ref_model, ref_opt, _, _ = tiny(method)
        train(ref_model, ref_opt, x, y, "fp32")
        assert rel_diff(w - start, weights(ref_model) - start) < 0.05


@pytest.mark.parametrize("method", ["sam", "esam"])
def test_fp16_overflow_skips_the_step_and_backs_off_the_scale(method):
    model, opt, x, y = tiny(method)
    start = weights(model)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 60)  # fp16 gradients overflow at this scale
    closure = make_closure(model, x, y, autocast=lambda: autocast_context("fp16", DEVICE))
    opt.step(closure, grad_scaler=scaler)
    torch.cuda.synchronize()
    assert torch.equal(weights(model), start)  # no update from inf/nan gradients
    assert scaler.get_scale() < 2.0 ** 60


def test_bf16_autocast_matches_fp32_up_to_rounding():
    model, opt, x, y = tiny("sam")
    start = weights(model)
    closure = train(model, opt, x, y, "bf16")
    assert closure.first_logits.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights stay fp32
    ref_model, ref_opt, _, _ = tiny("sam")
    train(ref_model, ref_opt, x, y, "fp32")
    assert rel_diff(weights(model) - start, weights(ref_model) - start) < 0.1


@pytest.mark.parametrize("method", ["sam", "esam"])
def test_channels_last_keeps_its_layout_and_the_update(method):
    model, opt, x, y = tiny(method, channels_last=True)
    start = weights(model)
    train(model, opt, x, y, "fp32", channels_last=True)
    convs = [p for p in model.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert torch.isfinite(weights(model)).all() and not torch.equal(weights(model), start)
    if method == "sam":
        ref_model, ref_opt, _, _ = tiny(method)
        train(ref_model, ref_opt, x, y, "fp32")
        assert rel_diff(weights(model) - start, weights(ref_model) - start) < 1e-2


@pytest.mark.parametrize("method", ["sgd", "sam", "esam"])
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_two_step_training_run_on_cuda(tmp_path, method, precision):
    from esam.train import run

    cfg = compose_cfg([*TRAIN, f"optimizer={method}", "trainer.epochs=1", "trainer.limit_train_batches=2",
                       f"trainer.precision={precision}"])
    summary = run(cfg, tmp_path)
    assert summary["device"] == "cuda" and summary["precision"] == precision
    assert summary["train_steps"] == 2
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["train_loss"] == pytest.approx(record["train_loss"])  # finite, not NaN
    assert 0 <= summary["test_acc_final"] <= 100


@pytest.fixture
def guard_signals():
    """A stand-in SIGTERM handler: the trainer chains to it after checkpointing, so pytest survives."""
    seen: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    yield seen
    signal.signal(signal.SIGTERM, previous)


def test_resume_on_cuda_continues_where_it_stopped(tmp_path, monkeypatch, guard_signals):
    from esam.runtime import load_checkpoint
    from esam.train import run

    ovr = [*TRAIN, "optimizer=sam", "trainer.epochs=2", "trainer.limit_train_batches=3",
           "trainer.precision=fp32"]
    straight = run(compose_cfg(ovr), tmp_path / "straight")

    step, count = SAM.step, [0]

    def stop_after_four(self, *args, **kwargs):  # SIGTERM mid-epoch 2, as a pre-emption would
        out = step(self, *args, **kwargs)
        count[0] += 1
        if count[0] == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(SAM, "step", stop_after_four)
    piece = tmp_path / "piece"
    with pytest.raises(SystemExit):
        run(compose_cfg(ovr), piece)
    monkeypatch.undo()
    assert guard_signals == [signal.SIGTERM]
    ckpt = load_checkpoint(piece / "checkpoints" / "last.pt")
    assert ckpt["global_step"] == 4

    resumed = run(compose_cfg([*ovr, f"trainer.resume={piece}"]), piece)
    assert resumed["pieces"] == 2 and resumed["device"] == "cuda"
    assert resumed["train_steps"] == straight["train_steps"] == 6
    rows = [json.loads(line) for line in Path(piece / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in Path(tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    # Same run up to GPU kernel non-determinism: the losses agree closely, not bitwise.
    assert rows[-1]["train_loss"] == pytest.approx(ref[-1]["train_loss"], rel=1e-2)
