"""The study's parent run: its params and tags, and the summary and plots it is closed with."""

from __future__ import annotations

import json
from typing import Any

from optuna.trial import TrialState

from harness import tracking
from harness.sweep.bookkeeping import (
    RUN_ATTR,
    counted,
)
from harness.sweep.plots import PLOTS_ARTIFACT_PATH, matplotlib_figures
from harness.sweep.spec import (
    StudySpec,
)
from harness.sweep.study import Sweep, make_pruner, make_sampler
from harness.urls import display_url


def study_params(spec: StudySpec) -> dict[str, Any]:
    """The parent run's params: base config, search space and objectives."""
    params: dict[str, Any] = {f"train.{k}": v for k, v in tracking.config_params(spec.train).items()}
    params |= {f"search.{key}": space.describe() for key, space in spec.search.items()}
    params |= {f"objective.{o.metric}": o.direction for o in spec.objective_list}
    return params


def study_tags(spec: StudySpec) -> dict[str, str]:
    """The parent run's tags: storage, sampler and pruner (`TPESampler {"seed": 0, ...}`), trials."""
    sampler, pruner = make_sampler(spec, 0), make_pruner(spec)
    sampler_options = spec.sampler.model_dump(exclude={"type"})
    pruner_options = spec.pruner.model_dump(exclude={"type"}) if spec.pruner else {}
    return {
        "optuna.storage": display_url(spec.storage_url),
        "optuna.sampler": f"{type(sampler).__name__} {json.dumps(sampler_options)}",
        "optuna.pruner": f"{type(pruner).__name__} {json.dumps(pruner_options)}",
        "harness.trials": str(spec.trials),
    }


def summary(sweep: Sweep) -> tuple[dict[str, float], dict[str, str], dict[str, str]]:
    """The parent run's closing metrics, tags and text files: best value and params, the trials table."""
    study, spec = sweep.study, sweep.spec
    trials = study.get_trials(deepcopy=False)
    done = counted(trials)
    metrics = {
        f"trials/{state.name.lower()}": float(sum(t.state == state for t in done))
        for state in TrialState
        if state.is_finished()
    }
    tags: dict[str, str] = {}
    frame = study.trials_dataframe(
        attrs=("number", "value", "state", "datetime_start", "duration", "params", "user_attrs")
    )
    texts = {"trials.csv": frame.to_csv(index=False)}
    if any(t.state == TrialState.COMPLETE for t in trials):
        if spec.multi_objective:
            front = [
                {"trial": t.number, "values": t.values, "params": t.params, RUN_ATTR: t.user_attrs.get(RUN_ATTR)}
                for t in study.best_trials
            ]
            texts["pareto_front.json"] = json.dumps(front, indent=2)
            tags["best.trials"] = ",".join(str(t.number) for t in study.best_trials)
        else:
            best = study.best_trial
            assert best.value is not None
            metrics[f"best/{spec.objective_list[0].metric}"] = best.value
            tags |= {"best.trial": str(best.number), "best.run_id": str(best.user_attrs.get(RUN_ATTR))}
            tags |= {f"best.{key}": str(value) for key, value in best.params.items()}
    tags[tracking.CLOSED_TAG] = str(len(done))
    return metrics, tags, texts


def close_study_run(sweep: Sweep, status: str, error: str | None = None) -> None:
    """Summarise the study in its parent run and close it with `status` (and the `error` that ended it)."""
    import matplotlib.pyplot as plt

    metrics, tags, texts = summary(sweep)
    if error is not None:
        tags[tracking.ERROR_TAG] = error
    objectives = [objective.metric for objective in sweep.spec.objective_list]
    figures = {
        f"{PLOTS_ARTIFACT_PATH}/{stem}.png": figure
        for stem, figure in matplotlib_figures(sweep.study, objectives).items()
    }
    step = len(counted(sweep.study.get_trials(deepcopy=False)))
    try:
        tracking.finish_study_run(sweep.client, sweep.parent_run_id, status, step, metrics, tags, texts, figures)
    finally:
        for figure in figures.values():
            plt.close(figure)
