"""Opening the Optuna storage and the study: heartbeats, sampler and pruner, the spec a study keeps."""

from __future__ import annotations

import functools
import json
import warnings
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec, TypeVar

import optuna
from mlflow.tracking import MlflowClient
from optuna.exceptions import ExperimentalWarning
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.exc import SQLAlchemyError

from harness.config import ConfigError
from harness.store_init import created_once
from harness.sweep.bookkeeping import (
    SPEC_ATTR,
    enqueue_retry,
)
from harness.sweep.lock import study_lock
from harness.sweep.outage import STORAGE_OUTAGE_S, outlasting, storage_outage_s
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
from harness.urls import display_url, sqlite_path

SQLITE_BUSY_TIMEOUT_S = 60
# A server database (PostgreSQL): each process holds few connections, so that one server serves many workers
# (a worker uses two at once: its trial and the trial's heartbeat), and checks each before use, so that
# connections a restart of the database cut are replaced rather than failing a call.
SERVER_ENGINE_KWARGS: dict[str, Any] = {"pool_size": 2, "max_overflow": 3, "pool_pre_ping": True, "pool_recycle": 1800}
POSTGRES_CONNECT_TIMEOUT_S = 10
DEFAULT_HEARTBEAT = Heartbeat()
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


def quiet_optuna() -> None:
    """Keep Optuna's log lines and its notes on experimental and heartbeat features off the display."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=ExperimentalWarning)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")


P = ParamSpec("P")
T = TypeVar("T")


def waiting_out_outages(
    method: Callable[Concatenate[ReconnectingRDBStorage, P], T],
) -> Callable[Concatenate[ReconnectingRDBStorage, P], T]:
    """`method` tried again while its database is out of reach, for up to the storage's `outage_s` (see
    `outlasting`): each call of these methods is one transaction, rolled back when it failed."""

    @functools.wraps(method)
    def call(storage: ReconnectingRDBStorage, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return outlasting(lambda: method(storage, *args, **kwargs), storage.outage_s, storage.url)

    return call


class ReconnectingRDBStorage(RDBStorage):
    """An RDBStorage whose calls wait out a database restart: each call that opens a transaction is tried
    again while the database is out of reach (see `waiting_out_outages`). Heartbeats are not: a trial's
    heartbeat thread simply beats again at its next interval."""

    outage_s: float = STORAGE_OUTAGE_S


for _name in (  # every RDBStorage method that opens a transaction, but record_heartbeat and schema upgrades
    "create_new_study",
    "delete_study",
    "set_study_user_attr",
    "set_study_system_attr",
    "get_study_id_from_name",
    "get_study_name_from_id",
    "get_study_directions",
    "get_study_user_attrs",
    "get_study_system_attrs",
    "get_trial_user_attrs",
    "get_trial_system_attrs",
    "get_all_studies",
    "_create_new_trial",
    "_set_trial_param",
    "get_trial_param",
    "set_trial_state_values",
    "set_trial_intermediate_value",
    "set_trial_user_attr",
    "set_trial_system_attr",
    "get_trial_id_from_study_id_trial_number",
    "get_trial",
    "_get_trials",
    "_get_best_trial_id",
    "_get_stale_trial_ids",
):
    setattr(ReconnectingRDBStorage, _name, waiting_out_outages(getattr(RDBStorage, _name)))


def engine_kwargs(url: str) -> dict[str, Any]:
    """SQLAlchemy engine options: SQLite waits for locks rather than failing; a server database gets small
    pools of checked connections, and PostgreSQL a connect timeout."""
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}
    if url.startswith("postgresql"):
        return {**SERVER_ENGINE_KWARGS, "connect_args": {"connect_timeout": POSTGRES_CONNECT_TIMEOUT_S}}
    return dict(SERVER_ENGINE_KWARGS)


def open_storage(url: str, heartbeat: Heartbeat = DEFAULT_HEARTBEAT) -> ReconnectingRDBStorage:
    """The RDB storage at `url` with heartbeats: a trial whose heartbeat is silent for the grace period is
    failed and retried. Its calls wait out a database out of reach for `storage_outage_s()`."""
    outage_s = storage_outage_s()
    path = sqlite_path(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    retry_silent = functools.partial(enqueue_retry, reason=f"its heartbeat was silent for over {heartbeat.grace_s} s")
    try:
        storage = created_once(
            lambda: ReconnectingRDBStorage(
                url,
                engine_kwargs=engine_kwargs(url),
                heartbeat_interval=heartbeat.interval_s,
                grace_period=heartbeat.grace_s,
                heartbeat_stale_trial_callback=retry_silent,
            )
        )
    except (ImportError, SQLAlchemyError) as err:
        raise ConfigError("storage", display_url(url), f"cannot open: {str(err).splitlines()[0]}") from None
    storage.outage_s = outage_s
    return storage


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
