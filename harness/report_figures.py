"""The report's own pictures, as matplotlib figures from plain data: the best trials' traversal grids side
by side, and every trial's objective against step."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure

STATE_STYLE = {  # how a trial's curve is drawn, by how it ended
    "COMPLETE": {"linestyle": "-", "alpha": 0.9},
    "PRUNED": {"linestyle": "--", "alpha": 0.6, "color": "0.55"},
    "FAIL": {"linestyle": ":", "alpha": 0.6, "color": "tab:red"},
}


@dataclass(frozen=True)
class Panel:
    image: np.ndarray  # (H, W, 3) a traversal grid
    caption: str


@dataclass(frozen=True)
class Curve:
    trial: int
    state: str  # COMPLETE, PRUNED, FAIL, RUNNING
    points: Sequence[tuple[int, float]]  # (step, value)


def traversal_panels(panels: Sequence[Panel], title: str) -> Figure:
    """The grids side by side, each captioned below."""
    figure = Figure(figsize=(3.2 * len(panels), 3.9), layout="constrained")
    figure.suptitle(title)
    for axes, panel in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels, strict=True):
        axes.imshow(panel.image, interpolation="nearest")
        axes.set_xticks([])
        axes.set_yticks([])
        axes.set_xlabel(panel.caption, fontsize=8)
    return figure


def objective_curves(curves_per_metric: Mapping[str, Sequence[Curve]]) -> Figure:
    """One plot per metric: each trial's value against step; pruned trials dashed grey, failed ones dotted red."""
    figure = Figure(figsize=(7, 3.6 * len(curves_per_metric)), layout="constrained")
    all_axes = figure.subplots(len(curves_per_metric), 1, squeeze=False)[:, 0]
    for axes, (metric, curves) in zip(all_axes, curves_per_metric.items(), strict=True):
        for state, style in STATE_STYLE.items():  # one legend entry per state
            axes.plot([], [], label=state.lower(), **({"color": "tab:blue"} | style))
        for curve in curves:
            if curve.points:
                steps, values = zip(*curve.points, strict=True)
                axes.plot(steps, values, marker=".", linewidth=1, **STATE_STYLE.get(curve.state, {}))
                axes.annotate(str(curve.trial), (steps[-1], values[-1]), fontsize=7, alpha=0.8)
        axes.set_xlabel("step")
        axes.set_ylabel(metric)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8, loc="best")
    return figure
