"""`harness sweep --workers 2` as a process of its own, interrupted or losing a worker mid-trial; both stores
read back afterwards."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import optuna
import psutil
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import FrozenTrial, TrialState

from tests.sweep_helpers import (
    LAMBDA_SEARCH,
    STOPS,
    TINY_TRAIN,
    WAIT_S,
    assert_nothing_running,
    counted_trials,
    runs_of,
    sweep_args,
    trials_of,
    wait_for,
    write_study,
)
from tests.worker_logs import log_tail


def start_sweep(study_file: Path, storage: str, tracking_uri: str, log: Path, workers: int) -> subprocess.Popen[bytes]:
    """`harness sweep --workers N` as a process of its own, its output in `log`."""
    command = [sys.executable, "-m", "harness.cli", *sweep_args(study_file, storage, tracking_uri)]
    with log.open("wb") as out:
        return subprocess.Popen(
            [*command, "--workers", str(workers)], cwd=study_file.parent, stdout=out, stderr=subprocess.STDOUT
        )


def running_trials(storage: str, name: str, tracking_uri: str) -> list[FrozenTrial]:
    """The RUNNING trials that have their MLflow run, oldest first; none before the sweep has created both
    stores (the MLflow file comes second), so that no two processes create tables at once."""
    if not Path(tracking_uri.removeprefix("sqlite:///")).is_file():
        return []
    running = optuna.load_study(study_name=name, storage=storage).get_trials(states=(TrialState.RUNNING,))
    return sorted((t for t in running if "mlflow_run_id" in t.user_attrs), key=lambda t: t.datetime_start)


def process_alive(worker: dict[str, Any]) -> bool:
    """Whether the process a trial's `worker` attr names is still there (not a later one with its pid)."""
    try:
        return abs(psutil.Process(int(worker["pid"])).create_time() - worker["started"]) <= 1
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(autouse=True)
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the bundled data's fallback, and nothing written into the repository


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "code", "error"), STOPS, ids=["SIGINT", "SIGTERM"])
def test_a_stop_signal_interrupts_both_workers_and_queues_a_retry_of_each_trial(
    tmp_path: Path, optuna_storage: str, tracking_uri: str, signum: int, code: int, error: str
) -> None:
    long = {**TINY_TRAIN, "steps": 2000, "eval_every": 1000, "log_every": 10}  # Ctrl-C lands long before the end
    study_file = write_study(tmp_path, "stop", 2, LAMBDA_SEARCH, train=long)
    log = tmp_path / "sweep.log"
    process = start_sweep(study_file, optuna_storage, tracking_uri, log, workers=2)
    try:
        wait_for(lambda: len(running_trials(optuna_storage, "stop", tracking_uri)) == 2, process, log)
        process.send_signal(signum)  # Ctrl-C, or a scheduler's SIGTERM, reaches the coordinator; it tells the workers
        assert process.wait(timeout=WAIT_S) == code, log_tail(log)
    finally:
        process.kill()
        process.wait()
    assert "interrupted: run the same command again to resume" in log.read_text()

    trials = trials_of(optuna_storage, "stop")
    interrupted = [t for t in trials if "retry_of" not in t.user_attrs]
    assert len(interrupted) == 2 and len(trials) == 4
    assert all(t.state == TrialState.FAIL and t.user_attrs["error"] == error for t in interrupted)
    assert len({t.user_attrs["worker"]["pid"] for t in interrupted}) == 2, "one trial in each worker"
    assert not any(process_alive(t.user_attrs["worker"]) for t in interrupted), "a worker outlived the sweep"
    waiting = {t.user_attrs["retry_of"]: t for t in trials if t.state == TrialState.WAITING}
    assert set(waiting) == {t.number for t in interrupted}
    assert all(waiting[t.number].system_attrs["fixed_params"] == t.params for t in interrupted)
    assert counted_trials(trials) == []

    parent, children = runs_of(tracking_uri, "stop")
    assert parent.info.status == "KILLED"
    runs = {run.info.run_id: run for run in children}
    assert len(runs) == 2
    for trial in interrupted:
        run = runs[trial.user_attrs["mlflow_run_id"]]
        assert run.info.status == "FAILED" and run.data.tags["error"] == error
        assert run.data.tags["harness.state"] == "INTERRUPTED"
    assert_nothing_running(trials, children, parent)


@pytest.mark.slow
def test_a_worker_killed_mid_trial_leaves_its_retry_to_the_other(
    tmp_path: Path, optuna_storage: str, tracking_uri: str
) -> None:
    steps = 30
    short = {**TINY_TRAIN, "steps": steps, "eval_every": 15, "log_every": 5}  # seconds: the kill lands mid-trial
    study_file = write_study(tmp_path, "survive", 2, LAMBDA_SEARCH, train=short)
    log = tmp_path / "sweep.log"
    process = start_sweep(study_file, optuna_storage, tracking_uri, log, workers=2)
    try:
        seen: list[FrozenTrial] = []

        def one_running() -> bool:
            seen[:] = running_trials(optuna_storage, "survive", tracking_uri)
            return bool(seen)

        # the first trial seen with its run, killed at once, far from its end; whether the other worker is
        # running the other trial by then, or still starting, is up to the machine's load
        wait_for(one_running, process, log)
        victim = seen[-1]
        workers = {child.pid for child in psutil.Process(process.pid).children()}
        os.kill(victim.user_attrs["worker"]["pid"], signal.SIGKILL)
        code = process.wait(timeout=WAIT_S)
        assert code == 0, log_tail(log)  # the study is full: a dead worker is no failure
    finally:
        process.kill()
        process.wait()
    output = log.read_text()
    assert re.search(r"worker \d was killed by signal 9", output), output
    assert f"trial {victim.number} LOST" in output

    trials = trials_of(optuna_storage, "survive")
    lost = trials[victim.number]
    assert lost.state == TrialState.FAIL
    retries = [t for t in trials if t.user_attrs.get("retry_of") == victim.number]
    assert len(retries) == 1 and len(trials) == 3
    retry = retries[0]
    assert retry.state == TrialState.COMPLETE and retry.params == victim.params
    (other,) = [t for t in trials if t.number != victim.number and "retry_of" not in t.user_attrs]
    assert other.state == TrialState.COMPLETE
    survivor = retry.user_attrs["worker"]["pid"]
    assert survivor != victim.user_attrs["worker"]["pid"] and survivor in workers, "the other worker runs the retry"
    assert [t.number for t in counted_trials(trials)] == sorted([other.number, retry.number])

    parent, children = runs_of(tracking_uri, "survive")
    runs = {run.info.run_id: run for run in children}
    lost_run = runs[victim.user_attrs["mlflow_run_id"]]
    assert lost_run.info.status == "KILLED" and lost_run.data.tags["harness.state"] == "LOST"
    evaluated = [m.step for m in MlflowClient(tracking_uri).get_metric_history(lost_run.info.run_id, "eval/cat_acc")]
    assert steps not in evaluated, "the kill landed after training"
    retry_run = runs[retry.user_attrs["mlflow_run_id"]]
    assert retry_run.info.status == "FINISHED" and retry_run.data.tags["harness.retry_of"] == str(victim.number)
    assert len(children) == 3 and parent.info.status == "FINISHED"
    assert_nothing_running(trials, children, parent)
