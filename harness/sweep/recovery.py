"""Recovery of lost trials: those whose worker died.

Only the coordinator (the `harness sweep` process) fails lost trials, so no two processes of a host retry
the same trial: RUNNING trials whose worker process is gone from this host, whose heartbeat is stale (any
host sharing an RDB storage), or that named no worker within the grace period.
"""

from __future__ import annotations

import socket
from datetime import datetime
from typing import Any

import optuna
import psutil
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from harness import signals, tracking
from harness.sweep.bookkeeping import (
    ERROR_ATTR,
    RETRY_ATTR,
    WORKER_ATTR,
    enqueue_retry,
    lost_reason,
)
from harness.sweep.runs import TrialEnd, close_trial_run
from harness.sweep.study import Sweep


def worker_identity() -> dict[str, Any]:
    """This process, recognisably even after its pid is reused: host, pid and start time."""
    me = psutil.Process()
    return {"host": socket.gethostname(), "pid": me.pid, "started": me.create_time()}


def worker_gone(trial: FrozenTrial, grace_s: int) -> bool:
    """True when a RUNNING trial's worker process is gone from this host, or when the trial named no
    worker within the grace period (its worker died right after asking). Other hosts' trials are left to
    their heartbeats."""
    worker = trial.user_attrs.get(WORKER_ATTR)
    if worker is None:
        started = trial.datetime_start
        return started is not None and (datetime.now() - started).total_seconds() > grace_s
    if worker["host"] != socket.gethostname():
        return False
    try:
        process = psutil.Process(worker["pid"])
        return process.status() == psutil.STATUS_ZOMBIE or abs(process.create_time() - worker["started"]) > 1
    except psutil.NoSuchProcess:
        return True


def gone_reason(trial: FrozenTrial, grace_s: int) -> str:
    """Why `worker_gone` holds for a trial."""
    worker = trial.user_attrs.get(WORKER_ATTR)
    if worker is None:
        return f"it named no worker within {grace_s} s"
    return f"its worker process {worker['pid']} is gone from {worker['host']}"


def recover(sweep: Sweep) -> None:
    """Fail and retry the lost trials, then close the trial runs their workers left RUNNING; under the study's
    lock, so that two workers never fail and retry one trial twice."""
    with signals.deferred(), sweep.lock():
        optuna.storages.fail_stale_trials(sweep.study)  # stale heartbeats; the storage's callback retries them
        for trial in sweep.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if not worker_gone(trial, sweep.heartbeat.grace_s):
                continue
            try:
                sweep.study.tell(trial.number, state=TrialState.FAIL)
            except (ValueError, UpdateFinishedTrialError):
                continue  # it ended meanwhile
            enqueue_retry(sweep.study, trial, gone_reason(trial, sweep.heartbeat.grace_s))
        close_orphan_runs(sweep)


def close_orphan_runs(sweep: Sweep) -> None:
    """Close each trial run (and seed run) left RUNNING by a trial that has ended; a lost trial's runs end
    KILLED."""
    trial_runs = tracking.running_trial_runs(sweep.client, sweep.spec.name)
    seed_runs = tracking.running_seed_runs(sweep.client, sweep.spec.name)
    if not trial_runs and not seed_runs:
        return
    trials = {t.number: t for t in sweep.study.get_trials(deepcopy=False)}
    retries = {t.user_attrs[RETRY_ATTR]: t for t in trials.values() if RETRY_ATTR in t.user_attrs}
    for number in {*trial_runs, *seed_runs}:
        trial = trials.get(number)
        if trial is None or not trial.state.is_finished():
            continue
        runs = [*seed_runs.get(number, []), *([trial_runs[number]] if number in trial_runs else [])]
        end, error = TrialEnd[trial.state.name], trial.user_attrs.get(ERROR_ATTR)
        if number in retries:
            end, error = TrialEnd.LOST, lost_reason(trial, retries[number])
        for run_id in runs:
            close_trial_run(sweep.client, run_id, end, error)
