"""Running one claimed trial: its config, its heartbeat, its reports to the pruner, its end in both stores."""

from __future__ import annotations

import contextlib
import gc
import math
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import optuna
import torch
from optuna.exceptions import StorageInternalError
from optuna.storages import RDBStorage
from optuna.trial import TrialState
from sqlalchemy.exc import SQLAlchemyError

from harness import signals, tracking
from harness.config import TrainConfig, build_train_config, set_train_key
from harness.evaluate import Evaluation
from harness.sweep.bookkeeping import (
    ERROR_ATTR,
    RETRY_ATTR,
    RUN_ATTR,
    SEEDS_ATTR,
    TrialEnd,
    close_trial_run,
    enqueue_retry,
)
from harness.sweep.outage import StorageUnavailable
from harness.sweep.seeds import SeedAggregate, aggregate, seed_configs
from harness.sweep.spec import (
    Aggregate,
    FloatSpace,
    IntSpace,
    Space,
    StudySpec,
)
from harness.sweep.storage import Sweep
from harness.train import Group, GroupListener, RunInfo, Trainer


def suggest(trial: optuna.Trial, key: str, space: Space) -> Any:
    """The trial's value for a search key, as the train config takes it."""
    if isinstance(space, FloatSpace):
        return trial.suggest_float(key, space.low, space.high, log=space.log, step=space.step)
    if isinstance(space, IntSpace):
        return trial.suggest_int(key, space.low, space.high, log=space.log, step=space.step)
    return space.decode(trial.suggest_categorical(key, space.optuna_choices()))


def trial_config(spec: StudySpec, trial: optuna.Trial) -> TrainConfig:
    """The base config with the trial's value for every search key."""
    tree = spec.train.model_dump()
    for key, space in spec.search.items():
        set_train_key(tree, key, suggest(trial, key, space), "search")
    return build_train_config(tree, f"trial {trial.number}")


class ObjectiveReporter(GroupListener):
    """Keeps each seed's last value of the objective metrics; at each evaluation after training began reports
    the (single) objective, aggregated across the seeds, to Optuna, its step counting those evaluations, and
    stops a trial the pruner prunes: the pruner sees the seeds together, never one lucky or unlucky seed."""

    def __init__(self, trial: optuna.Trial, metrics: Sequence[str], how: Aggregate, report: bool) -> None:
        self.trial, self.metrics, self.how, self.report = trial, tuple(metrics), how, report
        self.latest: list[dict[str, float]] = []  # per seed
        self.evaluations = 0

    def on_start(self, info: RunInfo, configs: Sequence[TrainConfig]) -> None:
        self.latest = [{} for _ in configs]

    def on_log_round(self, step: int, values: Sequence[dict[str, float]]) -> None:
        for latest, seed_values in zip(self.latest, values, strict=True):
            latest.update(seed_values)

    def on_eval_round(self, step: int, evaluations: Sequence[Evaluation]) -> None:
        for latest, evaluation in zip(self.latest, evaluations, strict=True):
            latest.update(evaluation.metrics)
        if step == 0:
            return  # the untrained baseline, alike for all trials of a seed: nothing to prune on
        self.evaluations += 1
        if not self.report or any(self.metrics[0] not in latest for latest in self.latest):
            return
        self.trial.report(aggregate([latest[self.metrics[0]] for latest in self.latest], self.how), self.evaluations)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at evaluation {self.evaluations} (step {step})")

    def seed_values(self) -> list[list[float]]:
        """Each seed's last value of each objective; ValueError when one is missing or not finite."""
        rows = []
        for latest in self.latest:
            row = []
            for metric in self.metrics:
                value = latest.get(metric)
                if value is None or not math.isfinite(value):
                    raise ValueError(f"objective {metric} is {'never logged' if value is None else value}")
                row.append(value)
            rows.append(row)
        return rows

    def values(self) -> list[float]:
        """The objectives' last values, aggregated across the seeds."""
        return [aggregate(list(column), self.how) for column in zip(*self.seed_values(), strict=True)]


@contextmanager
def heartbeat(storage: RDBStorage, study: optuna.Study, number: int, interval_s: int) -> Iterator[None]:
    """Record the trial's heartbeat in the storage every `interval_s` until the block ends."""
    trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study.study_name), number)
    stop = threading.Event()

    def beat() -> None:
        while True:
            # a busy or restarting database (Optuna wraps most of SQLAlchemy's errors): the next beat, within the grace
            with contextlib.suppress(SQLAlchemyError, StorageInternalError):
                storage.record_heartbeat(trial_id)
            if stop.wait(interval_s):
                return

    thread = threading.Thread(target=beat, name=f"heartbeat-{number}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def free_memory() -> None:
    """Release what a finished (or failed, e.g. out-of-memory) trial held, on the GPU too."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_trial(sweep: Sweep, trial: optuna.Trial, watchers: Sequence[GroupListener], trainer: Trainer) -> None:
    """Train one claimed trial with `trainer`, its `repeats` seeds in lockstep, and record its end in both
    stores. Errors fail the trial and are not raised; a stop signal marks it interrupted, queues its retry, and
    is raised; a storage that stays out of reach (StorageUnavailable) is raised."""
    spec, client = sweep.spec, sweep.client
    metrics = [objective.metric for objective in spec.objective_list]
    runs = TrialRuns()
    end, values, error = TrialEnd.COMPLETE, None, None
    try:
        with heartbeat(sweep.storage, sweep.study, trial.number, sweep.heartbeat.interval_s):
            retry_of = trial.user_attrs.get(RETRY_ATTR)
            tags = {tracking.RETRY_TAG: str(retry_of)} if retry_of is not None else {}
            runs.trial = tracking.start_trial_run(client, spec.name, sweep.parent_run_id, trial.number, tags)
            trial.set_user_attr(RUN_ATTR, runs.trial)
            reporter = ObjectiveReporter(trial, metrics, spec.aggregate, report=not spec.multi_objective)
            configs = seed_configs(trial_config(spec, trial), spec.repeats)
            if spec.repeats == 1:  # the trial's run is its only seed's
                group = Group(configs, [[tracking.RunLogger(client, runs.trial)]], [reporter, *watchers])
            else:
                for cfg in configs:
                    runs.seeds.append(tracking.start_seed_run(client, spec.name, runs.trial, trial.number, cfg.seed))
                loggers = [[tracking.RunLogger(client, run_id)] for run_id in runs.seeds]
                aggregated = SeedAggregate(client, runs.trial, spec.aggregate, metrics)
                group = Group(configs, loggers, [aggregated, reporter, *watchers])
            (outcome,) = trainer([group])
            if outcome.error is not None:
                raise outcome.error
            if spec.repeats > 1:
                trial.set_user_attr(
                    SEEDS_ATTR, {"seeds": [cfg.seed for cfg in configs], "values": reporter.seed_values()}
                )
            values = reporter.values()
    except optuna.TrialPruned:
        end = TrialEnd.PRUNED
    except KeyboardInterrupt as err:
        interrupt_trial(sweep, trial, runs, signals.reason(err))
        raise
    except StorageUnavailable:  # nothing can be recorded: the trial is recovered as lost once it is back
        raise
    except Exception as err:  # any error fails this trial only (out of memory too): the sweep goes on
        end, error = TrialEnd.FAIL, f"{type(err).__name__}: {err}"
    with signals.deferred():
        end_trial(sweep, trial, runs, end, values, error)
    free_memory()


@dataclass
class TrialRuns:
    """A trial's MLflow runs, as far as they were made: its own, and with repeats one per seed under it."""

    trial: str | None = None
    seeds: list[str] = field(default_factory=list)


def interrupt_trial(sweep: Sweep, trial: optuna.Trial, runs: TrialRuns, reason: str) -> None:
    """A stop signal: the trial fails as interrupted (`reason`) in both stores, and a retry is queued for the
    next start."""
    with signals.deferred():
        enqueue_retry(sweep.study, trial)
        end_trial(sweep, trial, runs, TrialEnd.INTERRUPTED, error=reason)


def end_trial(
    sweep: Sweep,
    trial: optuna.Trial,
    runs: TrialRuns,
    end: TrialEnd,
    values: list[float] | None = None,
    error: str | None = None,
) -> None:
    """Tell Optuna how the trial ended, then close its runs the same way. A
    trial failed meanwhile as lost (its heartbeat went stale) keeps that end: its retry runs it again."""
    running = sweep.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if any(t.number == trial.number for t in running):
        if error:
            trial.set_user_attr(ERROR_ATTR, error[:5000])
        sweep.study.tell(trial, values, state=end.optuna_state)
    else:
        end, error = TrialEnd.LOST, "failed as lost meanwhile (its heartbeat went stale); retried"
    for run_id in [*runs.seeds, *([runs.trial] if runs.trial else [])]:
        close_trial_run(sweep.client, run_id, end, error)
