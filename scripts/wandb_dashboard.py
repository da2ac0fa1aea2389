"""Build (or update) the dashboard: a saved W&B workspace view of an esam project.

    pip install -e '.[dashboard]'                       # wandb-workspaces, pinned in pyproject.toml
    python -m esam.report --wandb ENTITY/PROJECT --push  # fills perf/extra_vs_sgd_pct (needs SGD runs)
    python scripts/wandb_dashboard.py ENTITY/PROJECT [--group equal_compute] [--name "ESAM overhead"]

Runs are grouped by method (config optimizer.name), so every panel shows each method as mean ±
std over seeds. Panels read the names esam.loggers writes (its constants, not copies): per epoch
test/acc, train/loss, method/sharpness (every method's statistics are method/<stat>); per run test/acc_final, test/acc_best, perf/img_per_s,
compute/used (SGD-epoch equivalents), compute/extra_vs_sgd_pct (cost units vs SGD),
perf/wall_time_s, and perf/extra_vs_sgd_pct (measured time vs SGD, from the report's --push).
The "Accuracy vs compute" section puts a group's runs (e.g. +sweep=equal_compute) on one axis.
Needs a logged-in wandb (WANDB_API_KEY or `wandb login`); it talks to the W&B server, so the tests
only check the panel spec.
"""
from __future__ import annotations

import argparse
from typing import Any

from esam.loggers import ACC_BEST, ACC_FINAL, COMPUTE_EXTRA_PCT, COMPUTE_USED, WALL_TIME, stat_key, wandb_key

MEASURED_EXTRA = "perf/extra_vs_sgd_pct"  # written by `python -m esam.report --push`


def panel_spec() -> list[tuple[str, list[dict[str, Any]]]]:
    """(section, panels) with each panel's kind, title and the metric names it reads."""
    acc, loss, img_s, sharpness = (wandb_key(k) for k in ("test_acc", "train_loss", "img_per_s", stat_key("sharpness")))
    return [
        ("Accuracy vs compute", [
            {"kind": "scatter", "title": "final test accuracy vs compute used (SGD-epoch equivalents)",
             "x": COMPUTE_USED, "y": [ACC_FINAL]},
            {"kind": "scatter", "title": "final test accuracy vs training wall time (s)", "x": WALL_TIME,
             "y": [ACC_FINAL]},
            {"kind": "line", "title": "test accuracy vs compute used (per epoch)", "x": COMPUTE_USED, "y": [acc]},
            {"kind": "bar", "title": "compute overhead vs SGD, % (cost units)", "metrics": [COMPUTE_EXTRA_PCT]},
        ]),
        ("Accuracy", [
            {"kind": "line", "title": "test accuracy per epoch (mean ± std over seeds)", "x": "epoch", "y": [acc]},
            {"kind": "bar", "title": "best test accuracy %", "metrics": [ACC_BEST]},
            {"kind": "line", "title": "training loss", "x": "epoch", "y": [loss]},
        ]),
        ("Cost", [
            {"kind": "bar", "title": "training images/s (inside optimizer.step)", "metrics": [img_s]},
            {"kind": "bar", "title": "extra time vs SGD, % (python -m esam.report --push)", "metrics": [MEASURED_EXTRA]},
            {"kind": "scatter", "title": "accuracy vs throughput", "x": img_s, "y": [ACC_BEST]},
        ]),
        ("Sharpness", [
            {"kind": "line", "title": "loss increase under the perturbation", "x": "epoch", "y": [sharpness]},
        ]),
    ]


def build_workspace(entity: str, project: str, group: str | None = None, name: str = "ESAM overhead"):
    """The workspace object (not saved), one section per entry of :func:`panel_spec`."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    mean_std = dict(groupby=wr.Config("optimizer.name"), groupby_aggfunc="mean", groupby_rangefunc="stddev")

    def panel(p: dict[str, Any]):
        if p["kind"] == "scatter":
            return wr.ScatterPlot(title=p["title"], x=wr.SummaryMetric(p["x"]), y=wr.SummaryMetric(p["y"][0]))
        if p["kind"] == "bar":
            return wr.BarPlot(title=p["title"], metrics=p["metrics"], orientation="h", **mean_std)
        return wr.LinePlot(title=p["title"], x=p["x"], y=p["y"], **mean_std)

    sections = [ws.Section(name=title, is_open=title != "Sharpness", panels=[panel(p) for p in panels])
                for title, panels in panel_spec()]
    filters = [ws.Metric("JobType") == "train"]
    if group:
        filters.append(ws.Metric("Group") == group)
    return ws.Workspace(
        entity=entity, project=project, name=name, sections=sections,
        settings=ws.WorkspaceSettings(x_axis="epoch"),
        runset_settings=ws.RunsetSettings(groupby=[ws.Config("optimizer.name")], filters=filters),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("project", metavar="ENTITY/PROJECT")
    parser.add_argument("--group", help="only runs of this wandb group (experiment_name)")
    parser.add_argument("--name", default="ESAM overhead", help="the saved view's name")
    args = parser.parse_args()
    entity, _, project = args.project.partition("/")
    if not entity or not project:
        parser.error("give the project as ENTITY/PROJECT")
    workspace = build_workspace(entity, project, args.group, args.name).save()
    print(f"saved: {workspace.url}")


if __name__ == "__main__":
    main()
