"""The suite (conf/leaderboard/<suite>.yaml) and its jobs: one training run each, in a folder
named by what it runs, so a finished run is found again and never launched twice."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from esam.errors import UserError
from esam.leaderboard.space import SPACE_DIR, load_space, trials_for

SUITE_DIR = Path(__file__).resolve().parents[2] / "conf" / "leaderboard"
WORKLOAD_DIR = Path(__file__).resolve().parents[2] / "conf" / "workload"


@dataclass(frozen=True)
class Suite:
    name: str
    workloads: list[str]
    methods: list[str]
    baseline: str
    trials: int
    trial_seed: int
    seeds: list[int]
    root: Path
    out: Path
    executor: str = "joblib"
    n_jobs: int = 2
    overrides: list[str] = field(default_factory=list)
    submitit: dict[str, Any] = field(default_factory=dict)


def load_suite(name: str, suite_dir: Path | str = SUITE_DIR, dotlist: list[str] | None = None,
               **changes: Any) -> Suite:
    """The suite file ``<suite_dir>/<name>.yaml``, with ``dotlist`` (["trials=4", ...]) and
    ``changes`` (e.g. root=..., n_jobs=1; None = keep) on top."""
    path = Path(suite_dir) / f"{name}.yaml"
    if not path.is_file():
        have = sorted(p.stem for p in Path(suite_dir).glob("*.yaml"))
        raise UserError(f"unknown suite {name!r}; allowed: {', '.join(have)}")
    conf = OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(list(dotlist or [])))
    raw = {**OmegaConf.to_container(conf, resolve=True), **{k: v for k, v in changes.items() if v is not None}}
    allowed = set(Suite.__dataclass_fields__) - {"name"}
    unknown = set(raw) - allowed
    if unknown:
        raise UserError(f"{path}: unknown key {sorted(unknown)[0]}; allowed: {', '.join(sorted(allowed))}")
    suite = Suite(name=name, **{**raw, "root": Path(raw["root"]), "out": Path(raw["out"])})
    if suite.baseline not in suite.methods:
        raise UserError(f"{path}: baseline={suite.baseline!r} must be one of the methods {suite.methods}")
    if suite.executor not in ("joblib", "submitit"):
        raise UserError(f"{path}: executor={suite.executor!r}; allowed: joblib, submitit")
    if suite.trial_seed in suite.seeds:
        raise UserError(f"{path}: seeds {suite.seeds} must not contain trial_seed={suite.trial_seed} "
                        "(the selected trial is re-run on seeds the selection never saw)")
    for w in suite.workloads:
        if not (WORKLOAD_DIR / f"{w}.yaml").is_file():
            raise UserError(f"{path}: workload {w!r} has no conf/workload/{w}.yaml")
    for m in suite.methods:
        load_space(m)  # fails naming the method that has no search space
    return suite


@dataclass(frozen=True)
class Job:
    workload: str
    method: str
    stage: str                      # trial | final
    index: int                      # the trial's number, or the seed of a final run
    hparams: dict[str, Any]
    overrides: tuple[str, ...]      # python -m esam.train <these> trains it
    run_dir: Path

    @property
    def done(self) -> bool:
        """Finished (summary.json, written last) or failed for good (failed.json: a diverged run
        diverges again with the same seed)."""
        return (self.run_dir / "summary.json").is_file() or (self.run_dir / "failed.json").is_file()


def run_overrides(suite: Suite, workload: str, method: str, hparams: dict[str, Any], seed: int) -> tuple[str, ...]:
    space = load_space(method, SPACE_DIR)
    return (f"+workload={workload}", *space.overrides(hparams), f"seed={seed}",
            f"experiment_name=leaderboard_{suite.name}", *suite.overrides)


def trial_jobs(suite: Suite) -> list[Job]:
    jobs = []
    for w in suite.workloads:
        for m in suite.methods:
            for i, h in enumerate(trials_for(w, m, suite.trials)):
                jobs.append(Job(w, m, "trial", i, h, run_overrides(suite, w, m, h, suite.trial_seed),
                                suite.root / w / m / f"trial{i:02d}"))
    return jobs


def digest(hparams: dict[str, Any]) -> str:
    """Eight hex digits naming a setting: a final run's folder changes when the selection does."""
    return hashlib.sha1(json.dumps(hparams, sort_keys=True).encode()).hexdigest()[:8]


def final_jobs(suite: Suite, selected: dict[tuple[str, str], dict[str, Any] | None]) -> list[Job]:
    """The selected trial of each (workload, method) over the suite's seeds (none if every trial failed)."""
    jobs = []
    for (w, m), h in selected.items():
        if h is None:
            continue
        for s in suite.seeds:
            jobs.append(Job(w, m, "final", s, h, run_overrides(suite, w, m, h, s),
                            suite.root / w / m / f"final-{digest(h)}" / f"seed{s}"))
    return jobs
