"""Is the trainer's pipeline the bottleneck? Its SGD throughput against the bench's bare SGD steps.

    python -m esam.bench.pipeline [--steps 20 --rounds 6 --precision auto --model resnet18]
    python -m esam.bench.pipeline --publish      # into results/bench/ (default: outputs/bench/<time>/)

Both run in one process, interleaved: each round is one trainer epoch of ``steps`` steps (the
shared trainer on the synthetic CIFAR-shaped set: batch building and augmentation on the device,
the step, metric accumulation, the progress bookkeeping) and then ``steps`` bare SGD steps of
the bench on the same model, batch and precision. The first round is warm-up. Reported: the
trainer's images/s from its epoch wall time (everything in the training loop) and from its step
timer, each as % of the bench's SGD images/s.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from esam.bench.measure import Bench
from esam.bench.runner import PUBLISH_DIR
from esam.train import CONFIG_DIR, run


def compare(steps: int, rounds: int, precision: str, model: str, batch_size: int,
            num_threads: int = 0, device: str = "auto", overrides: tuple[str, ...] = ()) -> dict:
    """Interleave trainer epochs and bench SGD blocks; return per-round images/s and the ratios.

    ``overrides`` (dataset.* / model.* keys) apply to both sides, e.g. a smaller synthetic set."""
    common = [f"model={model}", "dataset=synthetic", f"dataset.batch_size={batch_size}", *overrides]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        bench_cfg = compose("bench", overrides=[*common, f"precision={precision}", "methods=[sgd]",
                                                f"num_threads={num_threads}", "warmup_steps=3", f"device={device}"])
        train_cfg = compose("train", overrides=[
            *common, "optimizer=sgd", f"trainer.precision={precision}", "trainer.epochs=1",
            f"trainer.limit_train_batches={steps}", "trainer.limit_test_batches=1",
            "trainer.timing_warmup_steps=0", "trainer.checkpoint_every=0", "trainer.keep_best=false",
            "trainer.progress=true", f"trainer.num_threads={num_threads}", f"trainer.device={device}",
        ])
    if num_threads > 0:
        torch.set_num_threads(num_threads)
    bench = Bench(bench_cfg)
    sgd = bench.methods[0]
    bench.warm_up(log=lambda line: print(line, flush=True))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            summary = run(train_cfg, Path(tmp) / f"round{r}")
            record = json.loads((Path(tmp) / f"round{r}" / "metrics.jsonl").read_text().splitlines()[-1])
            t0 = time.perf_counter()
            bench_s = sum(bench.timed_step(sgd) for _ in range(steps))
            block_wall = time.perf_counter() - t0
            rows.append({
                "round": r,
                "trainer_epoch_img_per_s": record["epoch_img_per_s"],
                "trainer_step_img_per_s": record["train_img_per_s"],
                "bench_sgd_img_per_s": steps * bench.batch_size / bench_s,
                "bench_block_wall_s": block_wall,
                "trainer_epoch_s": record["epoch_time_s"],
                "torch": summary["torch_version"],
            })
            print(f"round {r + 1}/{rounds}: trainer {rows[-1]['trainer_epoch_img_per_s']:.1f} img/s, "
                  f"bench {rows[-1]['bench_sgd_img_per_s']:.1f} img/s", flush=True)
    timed = rows[1:] if len(rows) > 1 else rows  # round 0 warms the trainer's own kernels up
    med = {k: statistics.median(r[k] for r in timed)
           for k in ("trainer_epoch_img_per_s", "trainer_step_img_per_s", "bench_sgd_img_per_s")}
    return {
        "steps": steps, "rounds": rounds, "precision": bench.precision, "model": model, "batch_size": batch_size,
        "device": str(bench.device), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "median": med,
        "epoch_pct_of_bench": 100.0 * med["trainer_epoch_img_per_s"] / med["bench_sgd_img_per_s"],
        "step_pct_of_bench": 100.0 * med["trainer_step_img_per_s"] / med["bench_sgd_img_per_s"],
        "rounds_detail": rows,
    }


def format_result(res: dict, command: str) -> str:
    m = res["median"]
    return "\n".join([
        f"### Trainer vs bench, SGD, {res['model']}, batch {res['batch_size']}, {res['precision']}, "
        f"{res['device']}, {res['threads']} threads, torch {res['torch']}",
        "",
        f"`{command}` (median of {len(res['rounds_detail']) - 1} interleaved rounds of {res['steps']} steps "
        "after one warm-up round)",
        "",
        "| measure | images/s | % of bench SGD |",
        "|---|---:|---:|",
        f"| bench: bare SGD steps | {m['bench_sgd_img_per_s']:.1f} | 100.0 |",
        f"| trainer: step timer | {m['trainer_step_img_per_s']:.1f} | {res['step_pct_of_bench']:.1f} |",
        f"| trainer: epoch wall time (data, augmentation, step, metrics) | {m['trainer_epoch_img_per_s']:.1f} "
        f"| {res['epoch_pct_of_bench']:.1f} |",
    ])


def output_stem(args: argparse.Namespace, res: dict) -> Path:
    """--out if given; else results/bench/ with --publish, else a fresh outputs/bench/<time>/ folder."""
    if args.out:
        return Path(args.out)
    device = res["device"].split(":")[0]
    name = f"trainer-vs-bench-{res['model']}-{device}-{res['precision']}"
    folder = Path(PUBLISH_DIR) if args.publish else Path("outputs/bench") / time.strftime("%Y-%m-%d_%H-%M-%S")
    return folder / name


def main(argv: list[str] | None = None, prog: str = "esam.bench.pipeline") -> None:
    p = argparse.ArgumentParser(prog=f"python -m {prog}", description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--precision", default="auto", help="auto | fp32 | bf16 | fp16 (CUDA)")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--num-threads", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a dataset.* or model.* override for both sides, e.g. --set dataset.num_train=512")
    p.add_argument("--out", default=None, help="write <out>.md and <out>.json (default: a fresh run folder)")
    p.add_argument("--publish", action="store_true", help=f"write into {PUBLISH_DIR}/ (the committed results)")
    p.add_argument("--min-pct", type=float, default=None,
                   help="exit 1 when the trainer's epoch images/s is below this %% of the bench's")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    if args.out and args.publish:
        p.error("--publish writes into results/bench/; --out names another place: give one of them")
    res = compare(args.steps, args.rounds, args.precision, args.model, args.batch_size, args.num_threads,
                  args.device, tuple(args.set))
    text = format_result(res, " ".join([f"python -m {prog}", *argv]))
    print(text)
    stem = output_stem(args, res)
    stem.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{stem}.md").write_text(text + "\n")
    Path(f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {stem}.md, {stem}.json")
    if args.min_pct is not None and res["epoch_pct_of_bench"] < args.min_pct:
        print(f"FAIL: the trainer's epoch throughput is {res['epoch_pct_of_bench']:.1f}% of the bench's "
              f"SGD steps, below --min-pct {args.min_pct:g}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
