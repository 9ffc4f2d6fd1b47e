"""A trial's seeds (`repeats` in the study file): their configs, the aggregate a trial is judged by, every metric
aggregated across the seeds, and the spread of the objectives."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from harness.config import TrainConfig
from harness.sweep.spec import Aggregate

SPREAD = ("std", "min", "max")  # logged on the trial run for each objective metric as seeds/<metric>/<stat>


def seed_configs(cfg: TrainConfig, repeats: int) -> list[TrainConfig]:
    """The trial's config at seeds `seed`, `seed + 1`, ..."""
    return [cfg.model_copy(update={"seed": cfg.seed + k}) for k in range(repeats)]


def aggregate(values: Sequence[float], how: Aggregate) -> float:
    """The seeds' values taken together: their mean, median or minimum."""
    column = np.asarray(values, dtype=np.float64)
    return float(column.min() if how == "min" else np.median(column) if how == "median" else column.mean())


def aggregate_metrics(per_seed: Sequence[Mapping[str, float]], how: Aggregate) -> dict[str, float]:
    """Each metric aggregated over the seeds that logged it."""
    names = dict.fromkeys(name for values in per_seed for name in values)
    return {name: aggregate([v[name] for v in per_seed if name in v], how) for name in names}


def spread_metrics(per_seed: Sequence[Mapping[str, float]], metrics: Sequence[str]) -> dict[str, float]:
    """`seeds/<metric>/std`, `/min` and `/max` of each of `metrics` that every seed logged (std: population,
    ddof 0, as the seeds are all there is)."""
    spread: dict[str, float] = {}
    for name in metrics:
        if all(name in values for values in per_seed):
            column = np.asarray([values[name] for values in per_seed], dtype=np.float64)
            stats = {"std": column.std(), "min": column.min(), "max": column.max()}
            spread |= {f"seeds/{name}/{stat}": float(stats[stat]) for stat in SPREAD}
    return spread
