"""Build (or update) the overhead dashboard: a saved W&B workspace view of an esam project.

    pip install -e '.[dashboard]'                       # wandb-workspaces, pinned in pyproject.toml
    python -m esam.report --wandb ENTITY/PROJECT --push  # fills perf/extra_vs_sgd_pct (needs SGD runs)
    python scripts/wandb_dashboard.py ENTITY/PROJECT [--group cifar10_resnet18] [--name "ESAM overhead"]

Runs are grouped by method (config optimizer.name), so every panel shows SGD, SAM and ESAM as
mean ± std over seeds. Panels read the names esam.loggers writes:
  test/acc (per epoch), test/acc_best, perf/img_per_s, perf/extra_vs_sgd_pct (from the report),
  train/loss, sam/sharpness.
Needs a logged-in wandb (WANDB_API_KEY or `wandb login`); it talks to the W&B server, so it is
never run by the tests.
"""
from __future__ import annotations

import argparse


def build_workspace(entity: str, project: str, group: str | None = None, name: str = "ESAM overhead"):
    """The workspace object (not saved): sections for accuracy, cost, and the accuracy/cost trade-off."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    by_method = wr.Config("optimizer.name")
    mean_std = dict(groupby=by_method, groupby_aggfunc="mean", groupby_rangefunc="stddev")
    sections = [
        ws.Section(name="Accuracy", is_open=True, panels=[
            wr.LinePlot(title="test accuracy per epoch (mean ± std over seeds)", x="epoch", y=["test/acc"],
                        **mean_std),
            wr.BarPlot(title="best test accuracy %", metrics=["test/acc_best"], orientation="h", **mean_std),
            wr.LinePlot(title="training loss", x="epoch", y=["train/loss"], **mean_std),
        ]),
        ws.Section(name="Cost", is_open=True, panels=[
            wr.BarPlot(title="training images/s (inside optimizer.step)", metrics=["perf/img_per_s"],
                       orientation="h", **mean_std),
            wr.BarPlot(title="extra compute vs SGD, % (python -m esam.report --push)",
                       metrics=["perf/extra_vs_sgd_pct"], orientation="h", **mean_std),
            wr.ScatterPlot(title="accuracy vs throughput", x=wr.SummaryMetric("perf/img_per_s"),
                           y=wr.SummaryMetric("test/acc_best")),
        ]),
        ws.Section(name="Sharpness", is_open=False, panels=[
            wr.LinePlot(title="loss increase under the perturbation", x="epoch", y=["sam/sharpness"], **mean_std),
        ]),
    ]
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
