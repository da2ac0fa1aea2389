"""wandb runs on this machine (``wandb/offline-run-*``, logged without a login, or the local copy of
an online run) -> the same rows as the public API gives, read from their ``run-<id>.wandb`` files.

A ``.wandb`` file is a LevelDB-style log of wandb's protobuf records: a 7-byte header (``:W&B``,
magic, version), then 32 KiB blocks of chunks, each with a 7-byte header (crc32c, length, type
FULL=1 FIRST=2 MIDDLE=3 LAST=4). The records used here: ``run`` (id, project, group, job type,
config), ``config`` (later config updates), ``history`` (one per ``log``), ``summary`` (updates,
applied in order) and ``exit`` (written by ``finish``: a run without one did not finish).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from esam.errors import UserError

BLOCK = 32768
HEADER = 7


def wandb_records(path: Path) -> list:
    """The records of a .wandb file, decoded with wandb's own protobuf schema."""
    try:
        from wandb.proto import wandb_internal_pb2 as pb
    except ImportError:
        raise UserError("reading local wandb runs needs wandb (pip install wandb)") from None
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise UserError(f"{path} is not a .wandb file (it does not start with ':W&B')")
    pos, parts, records = HEADER, b"", []
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # a block's tail too short for a header is zero padding
            pos += BLOCK - pos % BLOCK
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + HEADER:pos + HEADER + length], pos + HEADER + length
        if kind == 0:
            continue
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):
            records.append(pb.Record.FromString(parts))
    return records


def _items(update: Iterable[Any]) -> dict[str, Any]:
    return {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in update}


def read_wandb_file(path: Path) -> dict[str, Any]:
    """{id, project, entity, group, job_type, config, summary, history, exit_code (None: not
    finished)} of the run a .wandb file holds."""
    out: dict[str, Any] = {"id": None, "project": "", "entity": "", "group": "", "job_type": "", "config": {},
                           "summary": {}, "history": [], "exit_code": None}
    for r in wandb_records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out.update(id=r.run.run_id, project=r.run.project, entity=r.run.entity, group=r.run.run_group,
                       job_type=r.run.job_type)
            out["config"].update(_items(r.run.config.update))
        elif kind == "config":
            out["config"].update(_items(r.config.update))
        elif kind == "history":
            out["history"].append(_items(r.history.item))
        elif kind == "summary":
            out["summary"].update(_items(r.summary.update))
        elif kind == "exit":
            out["exit_code"] = r.exit.exit_code
    out["config"].pop("_wandb", None)
    return out


class LocalRun:
    """A local wandb run with what esam.report.wandb_runs reads of a public-API run."""

    def __init__(self, path: Path) -> None:
        run = read_wandb_file(path)
        self.file, self.id, self.group, self.job_type = Path(path), run["id"], run["group"], run["job_type"]
        self.summary, self.config, self._history = run["summary"], run["config"], run["history"]
        self.finished = run["exit_code"] == 0
        self.source = str(self.file.parent)  # the offline-run-* folder: where the row came from

    def history(self, keys: list[str] | None = None, pandas: bool = False) -> list[dict[str, Any]]:
        return [{k: v for k, v in h.items() if keys is None or k in keys} for h in self._history]


def find_wandb_files(paths: Iterable[str | Path]) -> list[Path]:
    """Every ``run-*.wandb`` at or below ``paths`` (a wandb/ folder, an offline-run-* folder, a run
    folder or a multirun folder above them, or the files themselves)."""
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise UserError(f"{p} does not exist (give ENTITY/PROJECT, or a folder with wandb runs in it)")
        found += [p] if p.is_file() else sorted(p.rglob("run-*.wandb"))
    return sorted(set(found))


def local_runs(paths: Iterable[str | Path], group: str | None = None) -> list[LocalRun]:
    """The finished training runs (job type train, exit code 0) below ``paths``, optionally one group."""
    paths = list(paths)
    files = find_wandb_files(paths)
    if not files:
        raise UserError(f"no wandb runs (run-*.wandb) below {' '.join(map(str, paths))}; a run logged with "
                        "logger=wandb keeps them in <run folder>/wandb/offline-run-*")
    runs = [LocalRun(f) for f in files]
    return [r for r in runs if r.finished and r.job_type == "train" and (not group or r.group == group)]
