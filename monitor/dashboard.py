"""The Evidently UI dashboard of the "sdloop" project: one panel per test of the verdict, over time.

Every report adds a run to the workspace (``monitor/report_files.add_to_workspace``), but runs alone leave the UI's
dashboard empty: a person had to open the runs one by one to see a trend. The dashboard plots, per run (its time is
the end of its current window), the values the verdict's tests check: generations in the current window, the share
of drifted prompt and image descriptors and each descriptor's drift score, the mean rating, the thumbs-down share,
the rating drift (PSI) and the 95th percentile latency. The error rate is our own test (from the failures table, not
an Evidently metric) and is in each run's report, not on the dashboard.

Panels select their series by Evidently's metric type and labels (the metric's parameters as strings, e.g.
``{"column": "rating"}``); the drift shares by their column list, so they follow ``monitor.frames``. A panel is added
when no panel of its title exists, so an older workspace gets the missing ones and a person's own panels stay.
"""

from __future__ import annotations

from typing import Any

from monitor.frames import IMAGE_COLUMNS, PROMPT_COLUMNS

TAB = "sdloop verdict"


def _metric(metric: str, legend: str, **labels: str) -> Any:
    from evidently.sdk.models import PanelMetric

    return PanelMetric(legend=legend, metric=metric, metric_labels=labels)


def panels() -> list[Any]:
    """The dashboard's panels, in order (each a DashboardPanelPlot)."""
    from evidently.sdk.panels import line_plot_panel

    def share(columns: tuple[str, ...]) -> dict[str, str]:
        return {"columns": str(list(columns)), "value_type": "share"}

    return [
        line_plot_panel("Generations in the current window", [_metric("RowCount", "generations")],
                        "the volume test: fewer than min_generations means no verdict", size="half"),
        line_plot_panel("Share of drifted prompt descriptors",
                        [_metric("DriftedColumnsCount", "prompt drift share", **share(PROMPT_COLUMNS))],
                        "prompt drift when at or above drift_share", size="half"),
        line_plot_panel("Share of drifted image descriptors",
                        [_metric("DriftedColumnsCount", "image drift share", **share(IMAGE_COLUMNS))],
                        "image drift when at or above drift_share", size="half"),
        line_plot_panel("Prompt descriptor drift scores",
                        [_metric("ValueDrift", c, column=c) for c in PROMPT_COLUMNS],
                        "Wasserstein distance over max(reference spread, floor); drifted above "
                        "prompt_drift_threshold", size="half"),
        line_plot_panel("Image descriptor drift scores",
                        [_metric("ValueDrift", c, column=c) for c in IMAGE_COLUMNS],
                        "drifted above image_drift_threshold", size="half"),
        line_plot_panel("Mean rating", [_metric("MeanValue", "mean rating", column="rating")],
                        "bad feedback below min_mean_rating", size="half"),
        line_plot_panel("Thumbs-down share", [_metric("MeanValue", "thumbs down", column="thumbs_down")],
                        "bad feedback above max_thumbs_down_share", size="half"),
        line_plot_panel("Rating drift (PSI)", [_metric("ValueDrift", "rating PSI", column="rating", method="psi")],
                        "bad feedback above rating_psi_threshold when the mean went down", size="half"),
        line_plot_panel("95th percentile latency (s)",
                        [_metric("QuantileValue", "latency p95", column="latency_s", quantile="0.95")],
                        "service test: above max_latency_p95_s", size="half"),
    ]


def ensure_dashboard(project: Any) -> list[str]:
    """Add to ``project``'s dashboard every panel of ours it lacks (by title); return the titles added."""
    have = {p.title for p in project.dashboard.model().panels}
    added = []
    for panel in panels():
        if panel.title not in have:
            project.dashboard.add_panel(panel, tab=TAB)
            added.append(panel.title)
    return added
