"""The catalogue of Optuna plots a study gets, for the sweep and the report alike."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from optuna.trial import FrozenTrial

PLOTS = ("optimization_history", "param_importances", "parallel_coordinate", "slice")  # optuna's plot_<name>


def plot_jobs(metrics: Sequence[str]) -> list[tuple[str, str, dict[str, Any]]]:
    """(file stem, Optuna plot name, its keyword arguments) of each plot of a study with these
    objectives: one of each plot per objective for several, plus the Pareto front for 2 or 3."""
    if len(metrics) == 1:
        return [(plot, plot, {"target_name": metrics[0]}) for plot in PLOTS]
    jobs = [
        (
            f"{plot}_{re.sub(r'[^A-Za-z0-9.-]+', '_', metric)}",
            plot,
            {"target": objective_value(i), "target_name": metric},
        )
        for plot in PLOTS
        for i, metric in enumerate(metrics)
    ]
    if len(metrics) <= 3:
        jobs.append(("pareto_front", "pareto_front", {"target_names": list(metrics)}))
    return jobs


def objective_value(index: int) -> Callable[[FrozenTrial], float]:
    """A plot target: one objective of a multi-objective trial."""
    return lambda trial: (trial.values or [])[index]
