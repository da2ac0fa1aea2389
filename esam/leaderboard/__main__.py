"""python -m esam.leaderboard [--suite cpu] [--jobs N] [--report-only]: run what is missing, then report.

Resumable: a run whose folder holds summary.json (or failed.json) is never launched again, so a
second call with everything finished trains nothing and only rewrites the report.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from esam.errors import UserError
from esam.leaderboard import report, score
from esam.leaderboard.execute import run_jobs
from esam.leaderboard.plan import Suite, final_jobs, load_suite, trial_jobs


def main(argv: list[str] | None = None, *, runner=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m esam.leaderboard", description=__doc__.splitlines()[0])
    p.add_argument("--suite", default="cpu", help="conf/leaderboard/<suite>.yaml (cpu | cifar)")
    p.add_argument("--suite-dir", default=None, help="folder of suite files (default conf/leaderboard)")
    p.add_argument("--jobs", type=int, default=None, help="parallel runs (default: the suite's n_jobs)")
    p.add_argument("--root", default=None, help="run folders (default: the suite's root)")
    p.add_argument("--out", default=None, help="report folder (default: the suite's out)")
    p.add_argument("--executor", choices=["joblib", "submitit"], default=None, help="default: the suite's")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="change a suite key (dotted, e.g. submitit.slurm_partition=gpu, trials=4)")
    p.add_argument("--report-only", action="store_true", help="launch nothing; report what has finished")
    args = p.parse_args(argv)
    kw = {"n_jobs": args.jobs, "root": args.root, "out": args.out, "executor": args.executor, "dotlist": args.set}
    suite = load_suite(args.suite, **({"suite_dir": args.suite_dir} if args.suite_dir else {}), **kw)
    return build_board(suite, report_only=args.report_only, **({"runner": runner} if runner else {}))


def build_board(suite: Suite, *, report_only: bool = False, **run_kw) -> dict:
    t0, started = time.perf_counter(), datetime.now(timezone.utc).isoformat(timespec="seconds")
    launched = {"trials": 0, "finals": 0}
    trials = trial_jobs(suite)
    print(f"leaderboard {suite.name}: {len(suite.workloads)} workloads x {len(suite.methods)} methods x "
          f"({suite.trials} trials + {len(suite.seeds)} seeds), runs in {suite.root}", flush=True)
    print(f"1/3 trials (seed {suite.trial_seed})", flush=True)
    if not report_only:
        launched["trials"] = run_jobs(trials, suite, say=_say, **run_kw)

    selected = {}
    for w in suite.workloads:
        for m in suite.methods:
            mine = [(j.index, j.hparams, score.read_validation(j.run_dir)) for j in trials
                    if j.workload == w and j.method == m]
            pick = score.select(mine)
            selected[(w, m)] = pick[1] if pick else None
    finals = final_jobs(suite, selected)
    print(f"2/3 the selected trials over seeds {suite.seeds}", flush=True)
    if not report_only:
        launched["finals"] = run_jobs(finals, suite, say=_say, **run_kw)

    print("3/3 targets, scores and the report", flush=True)
    targets = {}
    for w in suite.workloads:
        base = [score.read_validation(j.run_dir) for j in finals if j.workload == w and j.method == suite.baseline]
        targets[w] = score.target(base)
    result = report.build(suite, trials, finals, selected, targets)
    report.write(result, suite, suite.out)
    wall = time.perf_counter() - t0
    entry = {"started_utc": started, "suite": suite.name, "launched_trials": launched["trials"],
             "launched_finals": launched["finals"], "wall_s": round(wall, 1), "n_jobs": suite.n_jobs,
             "cpu_count": os.cpu_count(), "load_avg_at_end": round(os.getloadavg()[0], 2)}
    with open(Path(suite.out) / "make_log.jsonl", "a") as f:
        f.write(json.dumps(entry) + "\n")
    print(f"done in {wall:.0f}s: launched {launched['trials']} trials and {launched['finals']} seed re-runs; "
          f"{suite.out}/leaderboard.csv, table.md, profiles.png", flush=True)
    return {**result, "launched": launched, "selected": selected}


def _say(msg: str) -> None:
    print(msg, flush=True)


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
