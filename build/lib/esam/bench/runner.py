"""One bench run: measure, then write CSV/JSON/MD/PNG into the run folder (or, on request, results/).

A default run writes into its own folder (Hydra's ``outputs/bench/<time>/``), so trying the
bench never touches the committed reference numbers; ``publish=true`` writes into
``results/bench/`` and ``results_dir=DIR`` anywhere else.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from esam.bench.measure import Bench, Log
from esam.bench.plots import plot_bars, plot_grid
from esam.bench.tables import bench_rows, format_tables, grid_table, markdown_report, report_tables
from esam.config import BenchMode
from esam.errors import UserError
from esam.runtime import device_name, git_commit

PUBLISH_DIR = "results/bench"  # the committed reference results; written only with publish=true
TIMER = ("one opt.step(closure) + device sync; batches prebuilt; warm-up, FLOP steps and phase pass excluded; "
         "opt.set_progress spreads every pass over the window")


def output_dir(cfg: DictConfig) -> Path:
    """results_dir if given, results/bench with publish=true, else this run's own folder."""
    if cfg.results_dir and cfg.publish and Path(cfg.results_dir) != Path(PUBLISH_DIR):
        raise UserError(f"publish=true writes into {PUBLISH_DIR}; results_dir={cfg.results_dir} "
                        "asks for another folder; give one of them")
    if cfg.results_dir:
        return Path(cfg.results_dir)
    if cfg.publish:
        return Path(PUBLISH_DIR)
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # called as a function, not through `python -m esam.bench`
        return Path("outputs/bench") / time.strftime("%Y-%m-%d_%H-%M-%S")


def environment(bench: Bench) -> dict[str, Any]:
    """Provenance written next to every number: device, software, commit, command, load."""
    return {
        "device": bench.device.type,
        "device_name": device_name(bench.device),
        "torch": torch.__version__.split("+")[0],
        "torch_full": torch.__version__,
        "cuda": torch.version.cuda,
        # What configure_backends chose (CUDA): cuDNN autotuning, TF32 in matmuls and convolutions.
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "git_commit": git_commit(),
        "command": " ".join(["python -m esam.bench", *_overrides()]),
        "num_params": bench.num_params,
        "cpu_count": os.cpu_count(),
        "load_avg_1m_before": _load_avg(),
    }


def _load_avg() -> float:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return float("nan")


def _overrides() -> list[str]:
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except ValueError:  # called as a plain function, not through Hydra
        return []


def file_stem(bench: Bench, env: dict[str, Any]) -> str:
    stem = f"{bench.cfg.model.label}-{env['device']}-{bench.precision}-torch{env['torch']}"
    stem = f"{stem}-{bench.cfg.tag}" if bench.cfg.tag else stem
    return stem + ("-grid" if BenchMode(bench.cfg.mode) == BenchMode.grid else "")


def run(cfg: DictConfig, log: Log = print) -> dict[str, Any]:
    """Measure, write the CSV/JSON/PNG/MD files and return ``{'table', 'files', 'env'}``."""
    threads = torch.get_num_threads()
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    try:
        return _run(cfg, log)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: DictConfig, log: Log) -> dict[str, Any]:
    out = output_dir(cfg)  # a bad choice of folder fails before minutes of measuring
    bench = Bench(cfg)
    env = environment(bench)
    shape = f"{bench.batch_size}x{'x'.join(map(str, bench.input_shape))}"
    log(f"bench: {cfg.model.label} on {env['device_name']} ({env['threads']} threads), {bench.precision}, "
        f"channels_last={bench.channels_last}, batch {shape}, {len(bench.methods)} methods, "
        f"{cfg.repeats} repeats x {cfg.steps} steps; writing to {out}")
    if env["device"] == "cpu" and env["load_avg_1m_before"] > 0.5 * (os.cpu_count() or 1):
        log(f"warning: load average {env['load_avg_1m_before']} on {os.cpu_count()} cores: "
            "other processes share the CPU, so the timings will be noisy")
    bench.count_flops(log)
    bench.warm_up(log)
    bench.time_steps(log)
    bench.time_phases()
    env["load_avg_1m_after"] = _load_avg()
    env["phase_pass_foreign_cpu"] = round(bench.phase_foreign_cpu, 3)
    df = bench_rows(bench, env)

    out.mkdir(parents=True, exist_ok=True)
    stem = file_stem(bench, env)
    title = (f"{cfg.model.label}, batch {shape}, {bench.precision}{', channels_last' if bench.channels_last else ''}, "
             f"{env['device_name']}, torch {env['torch']}")
    files = {"csv": out / f"{stem}.csv", "json": out / f"{stem}.json", "md": out / f"{stem}.md"}
    df.to_csv(files["csv"], index=False, float_format="%.4g")
    payload = {
        "env": env,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "timer": TIMER,
        "rows": df.to_dict(orient="records"),
        "optimizers": {m.name: m.spec.spec for m in bench.methods},
        "flops_by_segment": {m.name: m.flops for m in bench.methods},
        "phase_ms": {m.name: m.phase_ms for m in bench.methods},
        "step_ms": {m.name: [[round(1e3 * t, 3) for t in b] for b in m.times] for m in bench.methods},
        "step_cost": {m.name: m.costs for m in bench.methods},
        "foreign_cpu": {m.name: [round(f, 3) for f in m.foreign] for m in bench.methods},
    }
    grid = grid_table(df, cfg.baseline) if BenchMode(cfg.mode) == BenchMode.grid else None
    if grid is not None:
        payload["grid"] = grid.to_dict(orient="records")
    files["json"].write_text(json.dumps(payload, indent=1, default=str))
    if cfg.plot:
        files["png"] = out / f"{stem}.png"
        if grid is not None:
            plot_grid(grid, title, files["png"])
        else:
            plot_bars(df, cfg.baseline, title, files["png"])
    tables = report_tables(df, bench)
    files["md"].write_text(markdown_report(tables, env, title))
    log(format_tables(tables))
    log("wrote " + ", ".join(str(p) for p in files.values()))
    if cfg.logger.name != "none":
        _log_to_logger(cfg, df, env, stem, str(out))
    return {"table": df, "files": files, "env": env}


def _log_to_logger(cfg: DictConfig, df, env: dict[str, Any], name: str, run_dir: str) -> None:
    """The rows as the run's summary (``<method>/<column>``) of a run in group 'bench'."""
    from esam.loggers import build_logger

    logger = build_logger(cfg.logger, name=name, group="bench", tags=[env["device"], cfg.model.label],
                          config={**OmegaConf.to_container(cfg, resolve=True), "env": env}, run_dir=run_dir)
    try:
        logger.log_summary({f"{r.method}/{col}": getattr(r, col) for r in df.itertuples()
                            for col in ("ms_step", "images_per_s", "extra_pct", "extra_flops_pct",
                                        "cost_model_extra_pct", "cost_measured_extra_pct")})
    finally:
        logger.finish()
