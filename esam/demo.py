"""`make demo`: SGD, SAM and ESAM (or any registered methods) on the embedded digits set,
then a side-by-side table.

    python -m esam.demo [--methods sam,looksam,msam] [settings for every run, e.g. trainer.epochs=5]
    make demo METHODS=sam,esam,looksam ARGS='trainer.epochs=5'

SGD always runs too: "compute vs SGD" is each method's time per image over SGD's on this machine.
"""
from __future__ import annotations

import argparse
import difflib
import sys
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from esam.errors import UserError
from esam.report import cell_table, cells_markdown, runs_frame
from esam.report.tables import NOTES, UNTIMED_NOTE
from esam.train import CONFIG_DIR, run

BASELINE = "sgd"
DEFAULT_METHODS = ("sgd", "sam", "esam")
DEMO_SETTINGS = ["experiment_name=demo", "trainer.epochs=10", "trainer.progress=false"]


def with_baseline(methods: tuple[str, ...]) -> tuple[str, ...]:
    """``methods`` with SGD first where it is missing: compute vs SGD needs an SGD run."""
    return methods if BASELINE in methods else (BASELINE, *methods)


def check_methods(methods: tuple[str, ...]) -> None:
    """An unknown name fails before any training, naming the allowed ones."""
    from esam.optim import get_method

    if not methods:
        raise UserError("--methods is empty; give registered method names, e.g. --methods sam,esam")
    for method in methods:
        get_method(method)


def compose_run(method: str, overrides: list[str], methods: tuple[str, ...] = ()):
    """The config of one demo run; a misspelt or bad setting is one sentence (:func:`explain`,
    which suggests the settings of ``methods``)."""
    try:
        return compose("train", overrides=[*DEMO_SETTINGS, f"optimizer={method}", *overrides])
    except Exception as e:
        if type(e).__module__.split(".")[0] not in ("hydra", "omegaconf"):
            raise
        raise UserError(explain(e, methods or (method,))) from None


def explain(e: Exception, methods: tuple[str, ...]) -> str:
    """Hydra's composition error -> one sentence that names the setting and what it could be
    (the nearest settings any of ``methods`` has there)."""
    text = str(e).strip()
    first = text.splitlines()[0] if text else type(e).__name__
    if first.startswith("Could not override '"):
        key = first.split("'")[1]
        parent, _, last = key.rpartition(".")
        found: set[str] = set()
        for method in methods:
            node = compose("train", overrides=[*DEMO_SETTINGS, f"optimizer={method}"])
            for part in parent.split(".") if parent else []:
                node = node.get(part) if hasattr(node, "get") else None
            found |= {str(k) for k in node.keys()} if hasattr(node, "keys") else set()
        keys = sorted(found)
        near = difflib.get_close_matches(last, keys, n=3)
        where = f"{parent}." if parent else ""
        hint = (f"did you mean {', '.join(where + k for k in near)}?" if near
                else f"the settings there: {', '.join(where + k for k in keys)}")
        return f"{key} is not a setting; {hint} (python -m esam.train --cfg job prints them all)"
    if first.startswith("Error merging override") and e.__cause__ is not None:
        cause = str(e.__cause__).strip().splitlines()
        return f"{first.removeprefix('Error merging override ')}: {cause[0] if cause else type(e.__cause__).__name__}"
    if "Available options in" in text:
        listed = text.split("Available options in", 1)[1].split("Config search path", 1)[0]
        options = [line.strip() for line in listed.splitlines()[1:]
                   if line.startswith("\t") and not line.strip().endswith("_schema")]
        missing = first.replace("In 'train': ", "")
        return f"{missing}; available: {', '.join(options)}"
    if first.startswith("Error parsing override"):
        return f"{first} (see https://hydra.cc/docs/advanced/override_grammar/basic/)"
    return first


def per_method(methods: tuple[str, ...], overrides: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """Which overrides each run takes, and notes: a method's own setting (``optimizer.rho=0.1``)
    goes only to the methods that have it (not to SGD); one that no method has stays, to fail
    with its sentence. Every other override goes to every run."""
    own = {m: compose_run(m, []).optimizer for m in methods}
    runs: dict[str, list[str]] = {m: [] for m in methods}
    notes = []
    for o in overrides:
        key = o.split("=", 1)[0]
        takers = [m for m in methods if key.startswith("optimizer.") and "=" in o
                  and _has(own[m], key.removeprefix("optimizer."))]
        if not takers or len(takers) == len(methods):
            takers = list(methods)
        else:
            notes.append(f"note: {key} applies to {', '.join(takers)} only (the others have no such setting)")
        for m in takers:
            runs[m].append(o)
    return runs, notes


def _has(node, dotted: str) -> bool:
    for part in dotted.split("."):
        if not hasattr(node, "keys") or part not in node:
            return False
        node = node[part]
    return True


def demo(overrides: list[str], out_root: Path, methods: tuple[str, ...] = DEFAULT_METHODS) -> list[dict]:
    """Train each method on the demo settings plus ``overrides``; returns their summaries."""
    check_methods(methods)
    summaries = []
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        runs, notes = per_method(methods, overrides)
        for note in notes:
            print(note, flush=True)
        # Every setting is checked before any training.
        cfgs = [compose_run(method, runs[method], methods) for method in methods]
        for method, cfg in zip(methods, cfgs):
            print(f"--- {method}: {cfg.dataset.name} / {cfg.model.label}, {cfg.trainer.epochs} epochs", flush=True)
            summaries.append(run(cfg, out_root / method))
    return summaries


def format_table(summaries: list[dict]) -> str:
    """The same table `python -m esam.report` writes, for these runs (one seed each), with its notes."""
    cells = cell_table(runs_frame(summaries))
    notes = [NOTES] + ([UNTIMED_NOTE] if cells.img_per_s_mean.isna().any() else [])
    return "\n".join([cells_markdown(cells), "", *notes])


def parser() -> argparse.ArgumentParser:
    from esam.optim import METHODS

    p = argparse.ArgumentParser(
        prog="python -m esam.demo", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n")[0],
        epilog="settings: any `python -m esam.train` override, applied to every run (the demo's own: "
               + " ".join(DEMO_SETTINGS) + ")\n\n  python -m esam.demo --methods looksam trainer.epochs=3\n"
               "  python -m esam.demo dataset=digits_noisy seed=1")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), metavar="M1,M2,...",
                   help=f"registered methods, comma-separated (default: {','.join(DEFAULT_METHODS)}); {BASELINE} "
                        f"is added where missing, as the baseline of 'compute vs SGD'. Allowed: {', '.join(METHODS)}")
    p.add_argument("settings", nargs="*", help="Hydra overrides for every run, e.g. trainer.epochs=5")
    return p


def parse_args(argv: list[str]) -> tuple[tuple[str, ...], list[str], str | None]:
    """(methods with the baseline, overrides, a note when SGD was added)."""
    args = parser().parse_intermixed_args(argv)
    asked = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    check_methods(asked)
    methods = with_baseline(asked)
    note = (None if methods == asked else
            f"note: running {BASELINE} too: 'compute vs SGD' is each method's time per image over SGD's")
    return methods, list(args.settings), note


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    out_root = Path("outputs") / "demo" / time.strftime("%Y-%m-%d_%H-%M-%S")
    try:
        methods, overrides, note = parse_args(argv)
        if note:
            print(note, flush=True)
        summaries = demo(overrides, out_root, methods)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print()
    print(format_table(summaries))
    print(f"\nRun folders (summary.json, metrics.jsonl, checkpoints): {out_root}/<method>")
    print(f"Plots and CSV: python -m esam.report {out_root} --out <folder>")
    print("Timing on a 77k-parameter model is dominated by per-step overhead, so 'compute vs SGD' (measured "
          "time) and 'compute (SGD-epochs)' (counted passes) disagree here; `make bench` measures the methods' "
          "cost on ResNet-18.")


if __name__ == "__main__":
    main()
