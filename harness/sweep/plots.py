"""Optuna's plots of a study, for the sweep's parent run and for `harness report` alike: one catalogue of
which plots a study gets, one renderer for either backend (plotly for HTML, matplotlib for PNG)."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import optuna
from optuna.trial import FrozenTrial, TrialState

PLOTS = ("optimization_history", "param_importances", "parallel_coordinate", "slice")  # optuna's plot_<name>
Backend = Literal["plotly", "matplotlib"]
PLOTS_ARTIFACT_PATH = "plots"  # in the study's parent run: the sweep's PNGs, and the report's files


@dataclass(frozen=True)
class PlotJob:
    stem: str  # the file name without its suffix
    plot: str  # optuna.visualization's plot_<plot>
    kwargs: dict[str, Any] = field(default_factory=dict)


def plot_jobs(study: optuna.Study, metrics: Sequence[str]) -> list[PlotJob]:
    """The plots of a study with these objectives: each of PLOTS (one per objective for several, plus the
    Pareto front for 2 or 3), and the intermediate values of a single objective that reports them. None
    before a trial completes."""
    trials = study.get_trials(deepcopy=False)
    if not any(t.state == TrialState.COMPLETE for t in trials):
        return []
    if len(metrics) == 1:
        jobs = [PlotJob(plot, plot, {"target_name": metrics[0]}) for plot in PLOTS]
        if any(t.intermediate_values for t in trials):
            jobs.append(PlotJob("intermediate_values", "intermediate_values"))
        return jobs
    jobs = [
        PlotJob(
            f"{plot}_{re.sub(r'[^A-Za-z0-9.-]+', '_', metric)}",
            plot,
            {"target": objective_value(i), "target_name": metric},
        )
        for plot in PLOTS
        for i, metric in enumerate(metrics)
    ]
    if len(metrics) <= 3:
        jobs.append(PlotJob("pareto_front", "pareto_front", {"target_names": list(metrics)}))
    return jobs


def objective_value(index: int) -> Callable[[FrozenTrial], float]:
    """A plot target: one objective of a multi-objective trial."""
    return lambda trial: (trial.values or [])[index]


def draw(study: optuna.Study, job: PlotJob, backend: Backend) -> Any | None:
    """The job's figure (a plotly Figure, or a matplotlib Figure), or None when the study cannot draw it yet
    (e.g. importances need two complete trials that differ)."""
    import matplotlib
    from optuna import visualization

    matplotlib.use("Agg")
    plots = visualization.matplotlib if backend == "matplotlib" else visualization
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # notes on studies too small to plot well, "experimental" backends
            figure = getattr(plots, f"plot_{job.plot}")(study, **job.kwargs)
    except (ValueError, RuntimeError):
        return None
    if backend == "matplotlib":  # the plot returns Axes, or an array of Axes
        return (figure.flat[0] if hasattr(figure, "flat") else figure).figure
    return figure


def matplotlib_figures(study: optuna.Study, metrics: Sequence[str]) -> dict[str, Any]:
    """The study's plots as matplotlib figures, by file stem; the caller closes them."""
    figures = {job.stem: draw(study, job, "matplotlib") for job in plot_jobs(study, metrics)}
    return {stem: figure for stem, figure in figures.items() if figure is not None}


def write_plots(study: optuna.Study, metrics: Sequence[str], folder: Path) -> list[Path]:
    """The study's plots as HTML (plotly) and PNG (matplotlib) files in `folder`; the HTML works offline: it
    loads plotly.js from the copy written once beside it."""
    from matplotlib import pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for job in plot_jobs(study, metrics):
        html, png = draw(study, job, "plotly"), draw(study, job, "matplotlib")
        if html is None or png is None:
            continue
        html.write_html(folder / f"{job.stem}.html", include_plotlyjs="directory")  # writes plotly.min.js
        png.savefig(folder / f"{job.stem}.png", dpi=100, bbox_inches="tight")
        plt.close(png)
        written += [folder / f"{job.stem}.html", folder / f"{job.stem}.png"]
    script = folder / "plotly.min.js"
    return [*written, script] if written and script.is_file() else written
