"""Run jobs: each composes its config with Hydra's compose API (the same conf/, schemas and
overrides as ``python -m esam.train``) and trains in its own folder.

Parallel runs go through joblib's loky processes by default: a worker is started once and trains
many runs, so Python, torch and the datasets are loaded once per core, not once per run of a few
seconds (submitit_local, like Hydra's other launchers, starts a process per job). Hydra's own
launchers cannot be driven with a list of trials from outside a Hydra sweeper, and a sweeper
plugin must live in the ``hydra_plugins`` package. ``executor: submitit`` sends the same jobs
to Slurm (or runs them locally where there is none) through submitit, as hydra/launcher=slurm does.
"""
from __future__ import annotations

import functools
import json
import logging
import shlex
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

from esam.errors import UserError
from esam.leaderboard.plan import Job, Suite

log = logging.getLogger("esam.leaderboard")


def command_line(overrides: Sequence[str], run_dir: str | Path) -> str:
    """The command that trains this run on its own, through the normal entry point."""
    return " ".join(["python -m esam.train", *map(shlex.quote, overrides), f"hydra.run.dir={shlex.quote(str(run_dir))}"])


# Overrides that set one value (no config group, no '+'): applied onto a config composed once per
# process for the rest, as Hydra would apply them. Composing takes about as long as one of the
# board's runs trains, so the trials of a (workload, method) share one compose.
VALUE_KEYS = ("optimizer.", "seed=")


def compose_run(overrides: Sequence[str]):
    """The config ``python -m esam.train <overrides>`` would train (see :data:`VALUE_KEYS`)."""
    import copy

    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    values = [o for o in overrides if o.startswith(VALUE_KEYS)]
    cfg = copy.deepcopy(_compose_base(tuple(o for o in overrides if not o.startswith(VALUE_KEYS))))
    parser = OverridesParser.create()
    for o in values:
        parsed = parser.parse_override(o)
        OmegaConf.update(cfg, parsed.key_or_group, parsed.value(), merge=False)
    return cfg


@functools.lru_cache(maxsize=64)
def _compose_base(overrides: tuple[str, ...]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import esam.config  # noqa: F401  (the schemas)
    from esam.train import CONFIG_DIR

    if GlobalHydra.instance().is_initialized():  # inside a Hydra app or a caller's initialize
        return compose("train", overrides=list(overrides))
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=list(overrides))


def run_job(overrides: Sequence[str], run_dir: str) -> str:
    """Train one run into ``run_dir``: "done", or "failed: <why>" (failed.json says it too: a
    diverged trial is a result of its setting, so it is not launched again)."""
    from omegaconf import OmegaConf

    from esam.train import run

    folder = Path(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "command.txt").write_text(command_line(overrides, run_dir) + "\n")
    esam_log = logging.getLogger("esam")
    handler = logging.FileHandler(folder / "train.log", mode="w")
    esam_log.addHandler(handler)
    level, propagate = esam_log.level, esam_log.propagate
    esam_log.setLevel(logging.INFO)
    esam_log.propagate = False  # the run's lines go to its train.log, not to the board's console
    try:
        cfg = compose_run(overrides)
        OmegaConf.save(cfg, folder / "config.yaml")
        run(cfg, folder)
        # The board reads metrics.jsonl and summary.json only; the final weights (and optimizer
        # state) of hundreds of runs would fill the disk for nothing.
        (folder / "checkpoints" / "last.pt").unlink(missing_ok=True)
        return "done"
    except UserError as e:
        (folder / "failed.json").write_text(json.dumps({"error": str(e)}) + "\n")
        return f"failed: {e}"
    finally:
        esam_log.removeHandler(handler)
        esam_log.setLevel(level)
        esam_log.propagate = propagate
        handler.close()


def run_jobs(jobs: list[Job], suite: Suite, *, runner: Callable[[Sequence[str], str], str] = run_job,
             say: Callable[[str], None] = print) -> int:
    """Run the jobs not yet done; returns how many were launched."""
    todo = [j for j in jobs if not j.done]
    if not todo:
        return 0
    t0, failed = time.perf_counter(), 0
    say(f"  launching {len(todo)} of {len(jobs)} runs ({len(jobs) - len(todo)} finished before), "
        f"{suite.executor}, {suite.n_jobs} at a time")
    for k, (job, status) in enumerate(_execute(todo, suite, runner), start=1):
        failed += status != "done"
        if status != "done" or k % 25 == 0 or k == len(todo):
            say(f"  [{k}/{len(todo)}] {time.perf_counter() - t0:.0f}s  {job.workload}/{job.method} "
                f"{job.stage} {job.index}: {status}")
    if failed:
        say(f"  {failed} run(s) failed (diverged or refused their setting): they count as not reaching the target")
    return len(todo)


def _execute(todo: list[Job], suite: Suite, runner) -> Iterable[tuple[Job, str]]:
    if suite.executor == "submitit":
        import submitit

        executor = submitit.AutoExecutor(folder=str(suite.root / ".submitit"))
        executor.update_parameters(**suite.submitit)
        handles = executor.map_array(runner, [list(j.overrides) for j in todo], [str(j.run_dir) for j in todo])
        for job, h in zip(todo, handles):
            yield job, h.result()
        return
    if suite.n_jobs == 1:  # in this process (tests, debugging)
        for job in todo:
            yield job, runner(job.overrides, str(job.run_dir))
        return
    from joblib import Parallel, delayed

    results = Parallel(n_jobs=suite.n_jobs, backend="loky", return_as="generator_unordered")(
        delayed(_tagged)(runner, i, j.overrides, str(j.run_dir)) for i, j in enumerate(todo))
    for i, status in results:
        yield todo[i], status


def _tagged(runner, i: int, overrides: Sequence[str], run_dir: str) -> tuple[int, str]:
    return i, runner(overrides, run_dir)
