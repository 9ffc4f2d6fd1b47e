"""Opening the Optuna storage: pools of checked connections, calls that wait out a database restart, heartbeats."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, TypeVar

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.storages import RDBStorage
from sqlalchemy.exc import SQLAlchemyError

from harness.errors import ConfigError
from harness.store_init import created_once
from harness.sweep.bookkeeping import (
    enqueue_retry,
)
from harness.sweep.outage import STORAGE_OUTAGE_S, outlasting, storage_outage_s
from harness.sweep.spec import (
    Heartbeat,
)
from harness.urls import display_url, sqlite_path

SQLITE_BUSY_TIMEOUT_S = 60
# A server database (PostgreSQL): each process holds few connections, so that one server serves many workers
# (a worker uses two at once: its trial and the trial's heartbeat), and checks each before use, so that
# connections a restart of the database cut are replaced rather than failing a call.
SERVER_ENGINE_KWARGS: dict[str, Any] = {"pool_size": 2, "max_overflow": 3, "pool_pre_ping": True, "pool_recycle": 1800}
POSTGRES_CONNECT_TIMEOUT_S = 10
DEFAULT_HEARTBEAT = Heartbeat()


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
