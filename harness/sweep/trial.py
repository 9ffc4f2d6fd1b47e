"""Running one claimed trial: its config, its heartbeat, its reports to the pruner, its end in both stores."""

from __future__ import annotations

import contextlib
import gc
import math
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import optuna
import torch
from mlflow.tracking import MlflowClient
from optuna.exceptions import StorageInternalError
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.exc import SQLAlchemyError

from harness import run_logging, signals, tracking
from harness.checkpoint import CheckpointError, check_checkpoint
from harness.config import TrainConfig, build_train_config, set_train_key
from harness.evaluate import Evaluation
from harness.seeding import initial_model
from harness.sweep.bookkeeping import (
    ERROR_ATTR,
    RETRY_ATTR,
    RUN_ATTR,
    SEEDS_ATTR,
    enqueue_retry,
)
from harness.sweep.outage import StorageUnavailable
from harness.sweep.runs import TrialEnd, close_trial_run
from harness.sweep.seeds import aggregate, aggregate_metrics, seed_configs, spread_metrics
from harness.sweep.spec import (
    Aggregate,
    StudySpec,
)
from harness.sweep.study import Sweep
from harness.train import Group, GroupListener, RunInfo, Trainer, pack_key, train_pack


def trial_config(spec: StudySpec, trial: optuna.Trial) -> TrainConfig:
    """The base config with the trial's value for every search key."""
    tree = spec.train.model_dump()
    for key, space in spec.search.items():
        set_train_key(tree, key, space.suggest(trial, key), "search")
    return build_train_config(tree, f"trial {trial.number}")


class SeedAggregate(GroupListener):
    """Logs a trial with repeats into its own run: the trial's config (at its first seed) and the seeds,
    then at every log and evaluation step each metric aggregated across the seeds and the spread of the
    objective metrics. Each seed's own metrics and traversals go to its run, nested under this one."""

    def __init__(self, client: MlflowClient, run_id: str, how: Aggregate, objectives: Sequence[str]) -> None:
        self.client, self.run_id, self.how, self.objectives = client, run_id, how, tuple(objectives)

    def on_start(self, info: RunInfo, configs: Sequence[TrainConfig]) -> None:
        run_logging.log_run_start(self.client, self.run_id, info, configs[0])
        seeds = " ".join(str(cfg.seed) for cfg in configs)
        tracking.log_params(self.client, self.run_id, {"repeats": len(configs), "aggregate": self.how, "seeds": seeds})

    def on_log_round(self, step: int, values: Sequence[dict[str, float]]) -> None:
        self.log(step, values)

    def on_eval_round(self, step: int, evaluations: Sequence[Evaluation]) -> None:
        self.log(step, [evaluation.metrics for evaluation in evaluations])

    def log(self, step: int, per_seed: Sequence[Mapping[str, float]]) -> None:
        metrics = aggregate_metrics(per_seed, self.how) | spread_metrics(per_seed, self.objectives)
        tracking.log_metrics(self.client, self.run_id, step, metrics)


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
    """Release what a finished (or failed, e.g. out-of-memory) trial held on the GPU. On the CPU, reference
    counting frees a trial's tensors as it ends; a full collection there costs ~0.5 s a trial for nothing."""
    if torch.cuda.is_initialized():
        gc.collect()
        torch.cuda.empty_cache()


Watchers = Callable[[int], Sequence[GroupListener]]  # a trial's display listeners, by trial number


@dataclass
class TrialRuns:
    """A trial's MLflow runs, as far as they were made: its own, and with repeats one per seed under it."""

    trial: str | None = None
    seeds: list[str] = field(default_factory=list)


def run_trials(sweep: Sweep, trials: Sequence[optuna.Trial], watchers: Watchers, trainer: Trainer = train_pack) -> None:
    """Train claimed trials, those of one architecture (`pack_key`) as one pack, in the order claimed, each
    with its `repeats` seeds as members; record each trial's end in both stores. Errors fail their trial and
    are not raised; a stop signal marks every trial not yet ended interrupted, queues their retries, and is
    raised; a storage that stays out of reach (StorageUnavailable) is raised."""
    pending = [PackedTrial(trial) for trial in trials]
    try:
        with contextlib.ExitStack() as beating:  # every claimed trial stays alive until it ends
            for trial in trials:
                beating.enter_context(heartbeat(sweep.storage, sweep.study, trial.number, sweep.heartbeat.interval_s))
            for pack in packs_of(sweep, pending):
                run_pack(sweep, pack, watchers, trainer)
    except KeyboardInterrupt as err:
        for packed in pending:
            if not packed.ended:
                interrupt_trial(sweep, packed.trial, packed.runs, signals.reason(err))
        raise
    finally:
        free_memory()


@dataclass
class PackedTrial:
    """A claimed trial on its way through a pack: its seeds' configs, the checkpoints it goes on from (a retry's:
    the lost trial's, one per seed) and the lost trial's run, its runs, the reporter that judges it, and whether
    its end is recorded."""

    trial: optuna.Trial
    configs: list[TrainConfig] = field(default_factory=list)
    resume: list[dict[str, Any]] = field(default_factory=list)
    lost: FrozenTrial | None = None
    runs: TrialRuns = field(default_factory=TrialRuns)
    reporter: ObjectiveReporter | None = None
    ended: bool = False

    @property
    def start(self) -> int:
        """The step it goes on from: 0, or its checkpoints'."""
        return int(self.resume[0]["step"]) if self.resume else 0


def packs_of(sweep: Sweep, pending: Sequence[PackedTrial]) -> list[list[PackedTrial]]:
    """The claimed trials grouped by architecture, in the order claimed; a trial whose config cannot be built
    fails here."""
    packs: dict[str, list[PackedTrial]] = {}
    for packed in pending:
        try:
            packed.configs = seed_configs(trial_config(sweep.spec, packed.trial), sweep.spec.repeats)
        except StorageUnavailable:
            raise
        except Exception as err:
            finish(sweep, packed, TrialEnd.FAIL, error=f"{type(err).__name__}: {err}")
            continue
        if RETRY_ATTR in packed.trial.user_attrs:
            find_checkpoints(sweep, packed)
        packs.setdefault(f"{pack_key(packed.configs[0])} from {packed.start}", []).append(packed)
    return list(packs.values())


def find_checkpoints(sweep: Sweep, packed: PackedTrial) -> None:
    """A retry goes on from the lost trial's latest checkpoints (each seed's), where it saved usable ones of one
    step; one that cannot be used is one line, and the retry trains from step 0."""
    number = packed.trial.user_attrs[RETRY_ATTR]
    lost = next((t for t in sweep.study.get_trials(deepcopy=False) if t.number == number), None)
    run_id = lost.user_attrs.get(RUN_ATTR) if lost is not None else None
    if lost is None or run_id is None:
        return
    run_ids = [run_id] if sweep.spec.repeats == 1 else tracking.seed_run_ids(sweep.client, run_id)
    try:
        checkpoints = [run_logging.load_checkpoint(sweep.client, seed_run) for seed_run in run_ids]
        if len(checkpoints) != len(packed.configs) or any(c is None for c in checkpoints):
            return  # it saved none (or not for every seed): from step 0
        found = [c for c in checkpoints if c is not None]
        fresh = [initial_model(cfg, torch.device("cpu")).state_dict() for cfg in packed.configs]
        steps = {check_checkpoint(c, cfg, state) for c, cfg, state in zip(found, packed.configs, fresh, strict=True)}
        if len(steps) > 1:
            raise CheckpointError(f"its seeds' checkpoints are of steps {sorted(steps)}")
    except CheckpointError as err:
        trial = packed.trial.number
        print(f"trial {trial}: the checkpoint of trial {number} cannot be used ({err}): from step 0", flush=True)
        return
    packed.resume, packed.lost = found, lost


def run_pack(sweep: Sweep, pack: list[PackedTrial], watchers: Watchers, trainer: Trainer) -> None:
    """Train trials of one architecture as one pack; each one's end is recorded when it stops (pruned,
    diverged, failed) or when the pack ends."""
    groups, members = [], []
    for packed in pack:
        try:
            groups.append(trial_group(sweep, packed, len(pack), watchers(packed.trial.number)))
            members.append(packed)
        except StorageUnavailable:
            raise
        except Exception as err:
            finish(sweep, packed, TrialEnd.FAIL, error=f"{type(err).__name__}: {err}")
    if not groups:
        return
    try:
        outcomes = trainer(groups)
    except (KeyboardInterrupt, StorageUnavailable):
        raise
    except Exception as err:  # the pack as a whole failed (out of memory, unreadable data): each of its trials
        for packed in members:
            finish(sweep, packed, TrialEnd.FAIL, error=f"{type(err).__name__}: {err}")
        return
    for packed, outcome in zip(members, outcomes, strict=True):
        if not packed.ended:
            finish_outcome(sweep, packed, outcome.error)


def trial_group(sweep: Sweep, packed: PackedTrial, pack_size: int, watchers: Sequence[GroupListener]) -> Group:
    """Start the trial's MLflow runs (one per seed under the trial's, with repeats) and make the pack group
    of its seeds: each seed logs to its run, the trial's run and the pruner see their aggregate."""
    spec, client, trial, runs = sweep.spec, sweep.client, packed.trial, packed.runs
    metrics = [objective.metric for objective in spec.objective_list]
    retry_of = trial.user_attrs.get(RETRY_ATTR)
    tags = {tracking.PACK_TAG: str(pack_size), **({tracking.RETRY_TAG: str(retry_of)} if retry_of is not None else {})}
    lost_run = packed.lost.user_attrs[RUN_ATTR] if packed.lost is not None else None
    if lost_run is not None:
        tags |= {tracking.RESUMED_FROM_TAG: lost_run, tracking.RESUMED_AT_TAG: str(packed.start)}
    runs.trial = tracking.start_trial_run(client, spec.name, sweep.parent_run_id, trial.number, tags)
    trial.set_user_attr(RUN_ATTR, runs.trial)
    packed.reporter = ObjectiveReporter(trial, metrics, spec.aggregate, report=not spec.multi_objective)
    if packed.lost is not None and not spec.multi_objective:  # the pruner sees the lost trial's reports again
        for evaluation, value in sorted(packed.lost.intermediate_values.items()):
            if evaluation * packed.configs[0].eval_every <= packed.start:
                trial.report(value, evaluation)
                packed.reporter.evaluations = evaluation
    judged = [packed.reporter, *watchers, EndsWhenStopped(sweep, packed)]
    if spec.repeats == 1:  # the trial's run is its only seed's
        if lost_run is not None:
            tracking.copy_metrics(client, lost_run, runs.trial, packed.start)
        return Group(packed.configs, [[run_logging.RunLogger(client, runs.trial)]], judged, packed.resume)
    for cfg in packed.configs:
        runs.seeds.append(tracking.start_seed_run(client, spec.name, runs.trial, trial.number, cfg.seed))
    if lost_run is not None:
        for lost_seed_run, seed_run in zip(tracking.seed_run_ids(client, lost_run), runs.seeds, strict=True):
            tracking.copy_metrics(client, lost_seed_run, seed_run, packed.start)
        tracking.copy_metrics(client, lost_run, runs.trial, packed.start)
    loggers = [[run_logging.RunLogger(client, run_id)] for run_id in runs.seeds]
    aggregated = SeedAggregate(client, runs.trial, spec.aggregate, metrics)
    return Group(packed.configs, loggers, [aggregated, *judged], packed.resume)


class EndsWhenStopped(GroupListener):
    """Records a trial's end as soon as its group stops in the pack (pruned, diverged, failed), not when the
    whole pack ends; what cannot be recorded now is recorded again when the pack ends."""

    def __init__(self, sweep: Sweep, packed: PackedTrial) -> None:
        self.sweep, self.packed = sweep, packed

    def on_stop(self, error: Exception) -> None:
        with contextlib.suppress(Exception):
            finish_outcome(self.sweep, self.packed, error)


def finish_outcome(sweep: Sweep, packed: PackedTrial, error: Exception | None) -> None:
    """Record how the trial's group ended in the pack: pruned, failed, or complete with its seeds' values."""
    if isinstance(error, optuna.TrialPruned):
        finish(sweep, packed, TrialEnd.PRUNED)
        return
    if error is not None:
        finish(sweep, packed, TrialEnd.FAIL, error=f"{type(error).__name__}: {error}")
        return
    assert packed.reporter is not None, "a trained trial has its reporter"
    try:
        values = packed.reporter.values()
    except ValueError as err:  # an objective never logged, or not finite
        finish(sweep, packed, TrialEnd.FAIL, error=f"{type(err).__name__}: {err}")
        return
    if sweep.spec.repeats > 1:
        seeds = [cfg.seed for cfg in packed.configs]
        packed.trial.set_user_attr(SEEDS_ATTR, {"seeds": seeds, "values": packed.reporter.seed_values()})
    finish(sweep, packed, TrialEnd.COMPLETE, values)


def finish(
    sweep: Sweep, packed: PackedTrial, end: TrialEnd, values: list[float] | None = None, error: str | None = None
) -> None:
    """Record the trial's end in both stores, once; then drop the checkpoints nothing will go on from (160 MB
    each): its own, and those of the lost trial it went on from. An interrupted trial keeps them for its retry."""
    with signals.deferred():
        end_trial(sweep, packed.trial, packed.runs, end, values, error)
        packed.ended = True
    saved = bool(packed.configs) and packed.configs[0].checkpoint_every != 0
    lost_run = packed.lost.user_attrs[RUN_ATTR] if packed.lost is not None else None
    runs = [*packed.runs.seeds, *([packed.runs.trial] if packed.runs.trial else [])] if saved else []
    if lost_run is not None:
        runs += [*tracking.seed_run_ids(sweep.client, lost_run), lost_run]
    for run_id in runs:
        run_logging.delete_artifacts(sweep.client, run_id, run_logging.CHECKPOINTS)


def interrupt_trial(sweep: Sweep, trial: optuna.Trial, runs: TrialRuns, reason: str) -> None:
    """A stop signal: the trial fails as interrupted (`reason`) in both stores, and a retry is queued for the
    next start."""
    with signals.deferred(), sweep.lock():
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
    """Tell Optuna how the trial ended, then close its runs the same way, under the study's lock: recovery, which
    closes the runs of ended trials whose workers died, never finds this trial ended with its runs still open.
    A trial failed meanwhile as lost (its heartbeat went stale) keeps that end: its retry runs it again. One whose
    end Optuna already holds (an earlier attempt got that far) only has its runs closed."""
    with sweep.lock():
        trials = sweep.study.get_trials(deepcopy=False)
        if any(t.number == trial.number and t.state == TrialState.RUNNING for t in trials):
            if error:
                trial.set_user_attr(ERROR_ATTR, error[:5000])
            sweep.study.tell(trial, values, state=end.optuna_state)
        elif any(t.user_attrs.get(RETRY_ATTR) == trial.number for t in trials):
            end, error = TrialEnd.LOST, "failed as lost meanwhile (its heartbeat went stale); retried"
        for run_id in [*runs.seeds, *([runs.trial] if runs.trial else [])]:
            close_trial_run(sweep.client, run_id, end, error)
