"""Opening the study: the spec's sampler and pruner, the spec a study keeps, and `Sweep`, what running its
trials takes."""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import optuna
from mlflow.tracking import MlflowClient
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from harness.errors import ConfigError
from harness.sweep.bookkeeping import SPEC_ATTR
from harness.sweep.lock import study_lock
from harness.sweep.spec import (
    CmaesSampler,
    GpSampler,
    GridSampler,
    Heartbeat,
    HyperbandPruner,
    MedianPruner,
    NoPruner,
    Nsga2Sampler,
    RandomSampler,
    StudySpec,
    SuccessiveHalvingPruner,
    TpeSampler,
)
from harness.sweep.storage import open_storage, quiet_optuna
from harness.urls import display_url, sqlite_path

SAMPLERS: dict[type, type[optuna.samplers.BaseSampler]] = {
    TpeSampler: optuna.samplers.TPESampler,
    RandomSampler: optuna.samplers.RandomSampler,
    CmaesSampler: optuna.samplers.CmaEsSampler,
    GpSampler: optuna.samplers.GPSampler,
    Nsga2Sampler: optuna.samplers.NSGAIISampler,
}
PRUNERS: dict[type, type[optuna.pruners.BasePruner]] = {
    MedianPruner: optuna.pruners.MedianPruner,
    HyperbandPruner: optuna.pruners.HyperbandPruner,
    SuccessiveHalvingPruner: optuna.pruners.SuccessiveHalvingPruner,
    NoPruner: optuna.pruners.NopPruner,
}


@dataclass(frozen=True)
class Sweep:
    """What running trials takes: the spec, the study and its storage, the MLflow client and parent run."""

    spec: StudySpec
    study: optuna.Study
    storage: RDBStorage
    client: MlflowClient
    parent_run_id: str
    heartbeat: Heartbeat

    def lock(self) -> AbstractContextManager[None]:
        """The study's lock: one worker, of any host, at a time."""
        return study_lock(self.storage, self.spec.storage_url, self.spec.name)


class StudyEndsGrid(optuna.samplers.GridSampler):
    """A GridSampler that leaves ending the study to `trials`: its own `study.stop()` works only inside
    `Study.optimize`, and this module asks and tells."""

    def after_trial(
        self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None
    ) -> None:
        return None


def make_sampler(spec: StudySpec, offset: int) -> optuna.samplers.BaseSampler:
    """The spec's sampler; a seed moves by `offset` so that a resumed or parallel worker draws anew."""
    options = spec.sampler.model_dump(exclude={"type"})
    if isinstance(spec.sampler, GridSampler):  # every worker must shuffle the grid alike
        return StudyEndsGrid({key: list(space.grid() or ()) for key, space in spec.search.items()}, **options)
    if options["seed"] is not None:
        options["seed"] += offset
    return SAMPLERS[type(spec.sampler)](**options)


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    """The spec's pruner; without one, median for a single objective and none for several."""
    pruner = spec.pruner or (NoPruner(type="none") if spec.multi_objective else MedianPruner(type="median"))
    return PRUNERS[type(pruner)](**pruner.model_dump(exclude={"type"}))


def open_study(spec: StudySpec, storage: RDBStorage, source: str, create: bool) -> optuna.Study:
    """The spec's study, created if new and `create`. A stored study whose objectives, base config or search
    space differ from the spec's is a ConfigError: resuming it would mix two experiments."""
    fingerprint = json.loads(json.dumps(spec.fingerprint()))
    if spec.name in optuna.study.get_all_study_names(storage):
        study = optuna.load_study(study_name=spec.name, storage=storage, pruner=make_pruner(spec))
        stored = study.user_attrs.get(SPEC_ATTR)
        if stored is not None and stored != fingerprint:
            key = next(k for k in fingerprint if stored.get(k) != fingerprint[k])
            where = f"the study '{spec.name}' in {display_url(spec.storage_url)}"
            raise ConfigError(source, key, f"differs from {where}; give the changed study a new name")
    elif create:
        study = optuna.create_study(
            study_name=spec.name,
            storage=storage,
            pruner=make_pruner(spec),
            directions=[objective.direction for objective in spec.objective_list],
            load_if_exists=True,
        )
    else:
        raise ConfigError(source, "name", f"no study '{spec.name}' in {display_url(spec.storage_url)}")
    if SPEC_ATTR not in study.user_attrs:
        study.set_user_attr(SPEC_ATTR, fingerprint)
        if spec.multi_objective:
            study.set_metric_names([objective.metric for objective in spec.objective_list])
    return study


def load_existing_study(storage: str, name: str, storage_source: str, name_source: str) -> optuna.Study:
    """A study that exists, creating nothing; a missing storage file or study is a ConfigError naming
    where the storage URL or the name came from (the study file or a flag)."""
    path = sqlite_path(storage)
    if path is not None and not path.is_file():
        key = "" if storage_source.startswith("--") else "storage"
        raise ConfigError(storage_source, key, f"no Optuna storage at {display_url(storage)}")
    quiet_optuna()
    rdb = open_storage(storage)
    names = optuna.study.get_all_study_names(rdb)
    if name not in names:
        held = ", ".join(sorted(names)) or "none"
        key = "" if name_source.startswith("--") else "name"
        raise ConfigError(name_source, key, f"no study '{name}' in {display_url(storage)} (it holds: {held})")
    return optuna.load_study(study_name=name, storage=rdb)
