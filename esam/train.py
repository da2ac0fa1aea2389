"""Hydra entry point: compose -> build -> Trainer -> summary.

    python -m esam.train dataset=cifar10 model=resnet18 optimizer=esam trainer.epochs=2
    python -m esam.train -m optimizer=sgd,sam,esam seed=0,1,2
    python -m esam.train optimizer=sam trainer.budget=2         # the compute of 2 SGD epochs
    python -m esam.train <the same overrides> trainer.resume=<run folder>   # continue there
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

import esam.config  # noqa: F401  (registers the schemas before Hydra composes)
from esam.errors import UserError

log = logging.getLogger("esam")
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")

# The trainer checkpoints on SIGUSR1 (and SIGTERM); make it the signal submitit asks Slurm for
# (`--signal=USR1@signal_delay_s`) and listens to. Set before the launcher imports submitit.
os.environ.setdefault("SUBMITIT_PREEMPT_SIGNAL", "USR1")
INTERRUPTED = "interrupted (Ctrl-C) before training started; nothing new was saved"


def output_dir_problem(path: str | Path) -> str | None:
    """Why the folder ``path`` cannot be created or written, or None if it can."""
    path = Path(path).absolute()
    for folder in (path, *path.parents):
        if folder.exists():
            if not folder.is_dir():
                return f"{folder} is a file, not a folder"
            if not os.access(folder, os.W_OK | os.X_OK):
                return f"{folder} is not writable"
            return None
    return None


class CheckOutputDir(Callback):
    """Hydra creates the run folder before ``main`` runs and reports a failure as a traceback;
    this callback (conf/train.yaml: hydra.callbacks) checks first and says it in one sentence."""

    @staticmethod
    def _check(path: str) -> None:
        problem = output_dir_problem(path)
        if problem is not None:
            print(f"error: output folder {path} cannot be created: {problem}", file=sys.stderr, flush=True)
            sys.exit(2)

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config.hydra.sweep.dir)


def added_key_problem(cfg: DictConfig, overrides: list[str]) -> str | None:
    """Why a ``+key=value`` override adds a key no schema knows, or None.

    Hydra suggests ``+trainer.epoch=2`` when ``trainer.epoch=2`` fails, and ``+`` then adds the
    key to the schema-typed node, where nothing reads it: a run that looks configured and is not.
    A ``+`` key is fine only under a free-form mapping (``model.args``, the bench's ``variants``)
    or as a config group (``+recipe=``, ``+sweep=``)."""
    import dataclasses
    import difflib

    from omegaconf import OmegaConf

    for text in overrides:
        if not text.startswith("+"):
            continue
        key = text.lstrip("+").partition("=")[0].strip()
        if "@" in key or (Path(CONFIG_DIR) / key.replace(".", "/")).is_dir():
            continue  # a config group (+recipe=..., +sweep=..., +optimizer/base=...)
        parent, _, last = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if parent and not isinstance(node, DictConfig):
            continue
        schema = OmegaConf.get_type(node) if parent else None
        if parent and not dataclasses.is_dataclass(schema):
            continue  # a free-form mapping: any key is the user's to add
        known = ([f.name for f in dataclasses.fields(schema)] if schema is not None
                 else [str(k) for k in node.keys() if str(k) != last])
        near = difflib.get_close_matches(last, known, n=3)
        where = f"{parent}." if parent else ""
        hint = (f"did you mean {', '.join(where + k for k in near)}?" if near
                else f"the keys there: {', '.join(where + k for k in sorted(known))}")
        return (f"{text.partition('=')[0]} adds {key}, which no setting reads; {hint} "
                "(python -m esam.train --cfg job lists every setting)")
    return None


def run(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Train one run described by ``cfg`` into ``run_dir``; returns the summary."""
    from esam.engine import Trainer

    return Trainer(cfg, run_dir).fit()


def resume_into_its_folder(argv: list[str]) -> list[str]:
    """``trainer.resume=<run folder>`` continues that run in that folder: the folder becomes the
    Hydra run folder (as for a Slurm job that submitit requeues), unless hydra.run.dir is given."""
    if any(a in ("-m", "--multirun") or a.startswith("hydra.run.dir=") for a in argv):
        return argv
    for a in argv:
        key, _, value = a.partition("=")
        if key.lstrip("+") == "trainer.resume" and value not in ("", "auto", "none", "null") and Path(value).is_dir():
            return [*argv, f"hydra.run.dir={value}"]
    return argv


def schema_choice_problem(argv: list[str]) -> str | None:
    """Why an override picks a schema (``optimizer=esam_schema``), or None. Hydra lists the
    structured-config schemas (esam/config.py) among a group's options, since they are stored in
    the group they check, but they are not choices: a run on one is a traceback. Generic: every
    schema is stored as ``<name>_schema`` (esam/config.py, esam/recipes.py); the other stored
    options (experiment=<recipe>_<method>) are real choices."""
    from hydra.core.config_store import ConfigStore

    conf = Path(CONFIG_DIR)
    for a in argv:
        key, eq, value = a.partition("=")
        key = key.lstrip("+~")
        if not eq or key.startswith("hydra") or not (conf / key).is_dir():
            continue
        try:
            stored = {n.removesuffix(".yaml") for n in ConfigStore.instance().list(key) if n.endswith(".yaml")}
        except OSError:  # no schema in this group
            continue
        for choice in value.split(","):  # a multirun sweep names several
            choice = choice.strip()
            if choice in stored and choice.endswith("_schema") and not (conf / key / f"{choice}.yaml").is_file():
                options = ", ".join(sorted({p.stem for p in (conf / key).glob("*.yaml")}
                                           | {n for n in stored if not n.endswith("_schema")}))
                return (f"{key}={choice} is the schema that checks the {key} options, not one of them; "
                        f"choose one of: {options}")
    return None


def remove_if_unused(run_dir: str | Path) -> None:
    """A run that failed before training leaves no folder behind: only what Hydra and the build
    put there (its config, an empty train.log, an empty checkpoints/) is removed, never results;
    then the parents Hydra made for it (outputs/<experiment>/<name>/seed0/) while they are empty,
    up to the current folder (never it, nor anything outside it)."""
    run_dir = Path(run_dir).absolute()
    ours = {".hydra", "train.log", "checkpoints"}
    try:
        entries = list(run_dir.iterdir())
    except OSError:
        return
    if any(p.name not in ours for p in entries) or any((run_dir / "checkpoints").glob("*")):
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    cwd = Path.cwd().absolute()
    for parent in run_dir.parents:
        if parent == cwd or cwd not in parent.parents:
            break
        try:
            parent.rmdir()  # only if empty
        except OSError:
            break


class PlainForEsam(logging.Formatter):
    """Our lines bare (the epoch lines are the table a user watches), other loggers' as Hydra formats them."""

    def __init__(self, other: logging.Formatter | None) -> None:
        super().__init__("%(message)s")
        self.other = other or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        if record.name == "esam" or record.name.startswith("esam."):
            return super().format(record)
        return self.other.format(record)


def plain_console() -> None:
    """Hydra logs to the console and to the run folder's train.log (with timestamps there)."""
    for handler in logging.getLogger().handlers:
        if type(handler) is logging.StreamHandler and not isinstance(handler.formatter, PlainForEsam):
            handler.setFormatter(PlainForEsam(handler.formatter))


def to_log_files(msg: str) -> None:
    """Write ``msg`` to the log files only (stderr already has it)."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, msg, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


@hydra.main(config_path=CONFIG_DIR, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    run_dir = HydraConfig.get().runtime.output_dir
    plain_console()
    if cfg.trainer.resume is None and os.environ.get("SUBMITIT_EXECUTOR"):
        # A submitit job may be requeued (time limit, pre-emption) into this same folder: it must
        # continue from checkpoints/last.pt, not start over. A first run finds none and starts fresh.
        cfg.trainer.resume = "auto"
    try:
        overrides = list(HydraConfig.get().overrides.task)
        if (problem := schema_choice_problem(overrides) or added_key_problem(cfg, overrides)) is not None:
            raise UserError(problem)
        summary = run(cfg, run_dir)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        to_log_files(f"error: {e}")  # train.log says how the run ended, too
        if int(os.environ.get("RANK", "0")) == 0:
            remove_if_unused(run_dir)
        sys.exit(2)
    except KeyboardInterrupt:  # from training on, Ctrl-C is the trainer's (esam/engine/signals.py)
        print(INTERRUPTED, file=sys.stderr, flush=True)
        if int(os.environ.get("RANK", "0")) == 0:
            remove_if_unused(run_dir)
        sys.exit(130)
    if int(os.environ.get("RANK", "0")) == 0:  # one line per run, not one per DDP rank
        from esam.engine.run_files import throughput

        log.info(f"done: test acc {summary['test_acc_final']:.2f}% (best {summary['test_acc_best']:.2f}%), "
                 f"{throughput(summary['img_per_s'], 'train img/s')}, run folder {run_dir}")
    return summary["test_acc_best"]  # for Hydra sweepers that optimise a value


if __name__ == "__main__":
    sys.argv[1:] = resume_into_its_folder(sys.argv[1:])
    if (problem := schema_choice_problem(sys.argv[1:])) is not None:
        print(f"error: {problem}", file=sys.stderr, flush=True)
        sys.exit(2)
    try:
        main()
    except KeyboardInterrupt:  # while Hydra composes the config
        print(INTERRUPTED, file=sys.stderr, flush=True)
        sys.exit(130)
