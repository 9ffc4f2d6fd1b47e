"""`harness sweep` on real SQLite stores in a temporary folder, read back through the Optuna and MLflow clients."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from harness import tracking
from harness.cli import main
from harness.config import TrainConfig
from harness.evaluate import Evaluation
from harness.sweep import bookkeeping, recovery
from harness.sweep import storage as sweep_storage
from harness.sweep import study as sweep_study
from harness.sweep.spec import Heartbeat, load_study_spec
from harness.sweep.trial import ObjectiveReporter
from harness.train import RunInfo
from tests.sweep_helpers import (
    LAMBDA_SEARCH,
    STOPS,
    TINY_TRAIN,
    WAIT_S,
    assert_nothing_running,
    assert_trial_matches_run,
    counted_trials,
    runs_of,
    start_sweep,
    sweep_args,
    trial_running,
    trials_of,
    wait_for,
    write_study,
)
from tests.worker_logs import log_tail


@pytest.fixture(autouse=True)
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the bundled data's fallback, and nothing written into the repository


def test_three_trial_sweep_then_resume(tmp_path: Path, optuna_storage: str, tracking_uri: str) -> None:
    study_file = write_study(tmp_path, "three", 3, LAMBDA_SEARCH)
    result = CliRunner().invoke(main, sweep_args(study_file, optuna_storage, tracking_uri))
    assert result.exit_code == 0, result.output
    assert "best trial" in result.output

    trials = trials_of(optuna_storage, "three")
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert len({t.params["loss.lambda_cat"] for t in trials}) == 3
    parent, children = runs_of(tracking_uri, "three")
    assert parent.info.run_name == "three" and parent.info.status == "FINISHED"
    assert parent.data.params["search.loss.lambda_cat"] == "float [0.5, 2.0] log"
    assert parent.data.params["train.steps"] == "4"
    assert parent.data.tags["optuna.sampler"].startswith("RandomSampler")
    assert parent.data.tags["optuna.pruner"].startswith("NopPruner")
    assert parent.data.tags["optuna.storage"] == optuna_storage
    best = max(trials, key=lambda t: t.values[0])
    assert parent.data.tags["best.trial"] == str(best.number)
    assert parent.data.metrics["best/eval/cat_acc"] == pytest.approx(best.values[0])
    client = MlflowClient(tracking_uri)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"trials.csv", "plots"} <= artifacts
    assert "plots/optimization_history.png" in {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}

    assert len(children) == 3
    for trial, run in zip(trials, children, strict=True):
        assert_trial_matches_run(trial, run, "three", parent)
        assert run.info.status == "FINISHED" and run.data.tags["harness.state"] == "COMPLETE"
        assert set(tracking.config_params(load_study_spec(study_file).train)) < set(run.data.params)
        history = client.get_metric_history(run.info.run_id, "eval/cat_acc")
        assert [m.step for m in history] == [0, 2, 4]  # the untrained baseline, then each evaluation
        assert trial.values[0] == pytest.approx(history[-1].value)
        assert trial.intermediate_values == {1: pytest.approx(history[1].value), 2: pytest.approx(history[2].value)}
        assert client.list_artifacts(run.info.run_id, "traversals")

    again = CliRunner().invoke(main, sweep_args(study_file, optuna_storage, tracking_uri))
    assert again.exit_code == 0, again.output
    assert "resuming study three: 3/3 finished" in again.output
    assert len(trials_of(optuna_storage, "three")) == 3
    parent, children = runs_of(tracking_uri, "three")
    assert len(children) == 3 and parent.info.status == "FINISHED"


def test_diverging_trial_fails_and_the_sweep_completes(tmp_path: Path, optuna_storage: str, tracking_uri: str) -> None:
    search = {"optim.lr_d": {"type": "categorical", "choices": [2.0e-4, 1.0e6]}}  # 1e6: NaN losses at once
    study_file = write_study(tmp_path, "diverge", 2, search, sampler={"type": "grid", "seed": 0})
    result = CliRunner().invoke(main, sweep_args(study_file, optuna_storage, tracking_uri))
    assert result.exit_code == 0, result.output

    trials = trials_of(optuna_storage, "diverge")
    by_lr = {t.params["optim.lr_d"]: t for t in trials}
    assert len(trials) == 2 and set(by_lr) == {2.0e-4, 1.0e6}
    diverged, fine = by_lr[1.0e6], by_lr[2.0e-4]
    assert diverged.state == TrialState.FAIL and diverged.user_attrs["error"].startswith(
        "DivergenceError: non-finite loss"
    )
    assert fine.state == TrialState.COMPLETE
    parent, children = runs_of(tracking_uri, "diverge")
    runs = {run.info.run_id: run for run in children}
    failed = runs[diverged.user_attrs["mlflow_run_id"]]
    assert failed.info.status == "FAILED" and failed.data.tags["error"].startswith("DivergenceError")
    assert runs[fine.user_attrs["mlflow_run_id"]].info.status == "FINISHED"
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials/fail"] == 1
    assert_nothing_running(trials, children, parent)


@pytest.mark.slow
def test_killed_sweep_resumes_with_a_retry_of_the_lost_trial(
    tmp_path: Path, optuna_storage: str, tracking_uri: str
) -> None:
    long_enough = {**TINY_TRAIN, "steps": 20, "eval_every": 10}  # the kill lands while it trains
    study_file = write_study(tmp_path, "kill", 1, LAMBDA_SEARCH, train=long_enough)
    log = tmp_path / "first.log"
    process = start_sweep(study_file, optuna_storage, tracking_uri, log)
    try:
        wait_for(trial_running(optuna_storage, "kill", tracking_uri), process, log)
    finally:
        process.kill()
        process.wait()

    result = CliRunner().invoke(main, sweep_args(study_file, optuna_storage, tracking_uri))
    assert result.exit_code == 0, result.output
    trials = trials_of(optuna_storage, "kill")
    killed = trials[0]
    assert killed.state == TrialState.FAIL
    retries = [t for t in trials if t.user_attrs.get("retry_of") == killed.number]
    assert len(retries) == 1
    assert retries[0].state == TrialState.COMPLETE and retries[0].params == killed.params
    assert counted_trials(trials) == retries and len(trials) == 2  # the retry fills the one place
    assert f"trial {killed.number} LOST" in result.output

    parent, children = runs_of(tracking_uri, "kill")
    runs = {run.info.run_id: run for run in children}
    lost = runs[killed.user_attrs["mlflow_run_id"]]
    assert lost.info.status == "KILLED" and lost.data.tags["harness.state"] == "LOST"
    retry_run = runs[retries[0].user_attrs["mlflow_run_id"]]
    assert retry_run.info.status == "FINISHED" and retry_run.data.tags["harness.retry_of"] == str(killed.number)
    assert len(children) == 2 and parent.info.status == "FINISHED"
    assert_nothing_running(trials, children, parent)


# Ctrl-C and SIGTERM (timeout, Kubernetes, SLURM, systemd): the exit code and the error a stopped trial keeps
@pytest.mark.slow
@pytest.mark.parametrize(("signum", "code", "error"), STOPS, ids=["SIGINT", "SIGTERM"])
def test_a_stop_signal_marks_the_trial_interrupted_in_both_stores(
    tmp_path: Path, optuna_storage: str, tracking_uri: str, signum: int, code: int, error: str
) -> None:
    long = {**TINY_TRAIN, "steps": 200}  # the signal lands while it trains; it never trains to the end
    study_file = write_study(tmp_path, "interrupt", 2, LAMBDA_SEARCH, train=long)
    log = tmp_path / "sweep.log"
    process = start_sweep(study_file, optuna_storage, tracking_uri, log)
    try:
        wait_for(trial_running(optuna_storage, "interrupt", tracking_uri), process, log)
        process.send_signal(signum)
        assert process.wait(timeout=WAIT_S) == code, log_tail(log)
    finally:
        process.kill()
        process.wait()

    trials = trials_of(optuna_storage, "interrupt")
    interrupted = trials[0]
    assert interrupted.state == TrialState.FAIL and interrupted.user_attrs["error"] == error
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    assert [t.user_attrs["retry_of"] for t in waiting] == [interrupted.number]
    assert waiting[0].system_attrs["fixed_params"] == interrupted.params
    parent, children = runs_of(tracking_uri, "interrupt")
    assert parent.info.status == "KILLED"
    run = {run.info.run_id: run for run in children}[interrupted.user_attrs["mlflow_run_id"]]
    assert run.info.status == "FAILED" and run.data.tags["error"] == error
    assert run.data.tags["harness.state"] == "INTERRUPTED"
    assert_nothing_running(trials, children, parent)


@pytest.mark.slow
def test_two_workers_share_one_storage(tmp_path: Path, optuna_storage: str, tracking_uri: str) -> None:
    study_file = write_study(tmp_path, "pair", 3, LAMBDA_SEARCH)
    result = CliRunner().invoke(main, sweep_args(study_file, optuna_storage, tracking_uri, "--workers", "2"))
    assert result.exit_code == 0, result.output

    trials = trials_of(optuna_storage, "pair")
    assert len(counted_trials(trials)) == 3
    assert all(t.state == TrialState.COMPLETE for t in counted_trials(trials))
    assert len({t.params["loss.lambda_cat"] for t in trials}) == len(trials), "the workers drew the same params"
    # whether the second worker, still importing torch, gets a trial before the first ends them all is up to
    # the machine's load: only that the trials ran in at most two worker processes, none this one, is certain
    pids = {t.user_attrs["worker"]["pid"] for t in trials}
    assert 1 <= len(pids) <= 2 and os.getpid() not in pids, pids
    parent, children = runs_of(tracking_uri, "pair")
    ran = [t for t in trials if "mlflow_run_id" in t.user_attrs]
    assert len(children) == len(ran) == 3, "one run per trial, none twice"
    for trial, run in zip(ran, children, strict=True):
        assert_trial_matches_run(trial, run, "pair", parent)
        assert run.info.status == "FINISHED"
    assert_nothing_running(trials, children, parent)


def open_sweep(tmp_path: Path, storage: str, tracking_uri: str, heartbeat: Heartbeat) -> sweep_study.Sweep:
    """A study and its parent run as `harness sweep` opens them, for the bookkeeping tests below."""
    spec = load_study_spec(write_study(tmp_path, "book", 2, LAMBDA_SEARCH), storage=storage, tracking_uri=tracking_uri)
    optuna_storage = sweep_storage.open_storage(storage, heartbeat)
    study = sweep_study.open_study(spec, optuna_storage, "book.yaml", create=True)
    client = tracking.client_for(tracking_uri)
    parent = tracking.open_study_run(client, spec.name, None, {}, {})
    return sweep_study.Sweep(spec, study, optuna_storage, client, parent, heartbeat)


def test_recovery_fails_and_retries_trials_of_dead_or_silent_workers(
    tmp_path: Path, optuna_storage: str, tracking_uri: str
) -> None:
    sweep_storage.quiet_optuna()
    sweep = open_sweep(tmp_path, optuna_storage, tracking_uri, Heartbeat(interval_s=1, grace_s=2))
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, check=True, text=True
    )
    identity = recovery.worker_identity()

    here = sweep.study.ask()  # a worker of this host that has exited
    here.suggest_float("loss.lambda_cat", 0.5, 2.0, log=True)
    here.set_user_attr("worker", {**identity, "pid": int(dead.stdout)})
    run_id = tracking.start_trial_run(sweep.client, "book", sweep.parent_run_id, here.number, {})
    here.set_user_attr("mlflow_run_id", run_id)
    elsewhere = sweep.study.ask()  # a worker on another host whose heartbeat stopped
    elsewhere.suggest_float("loss.lambda_cat", 0.5, 2.0, log=True)
    elsewhere.set_user_attr("worker", {**identity, "host": "elsewhere"})
    sweep.storage.record_heartbeat(
        sweep.storage.get_trial_id_from_study_id_trial_number(
            sweep.storage.get_study_id_from_name("book"), elsewhere.number
        )
    )
    alive = sweep.study.ask()  # this very process: alive
    alive.set_user_attr("worker", identity)
    time.sleep(3.5)  # past the 2 s grace even to the second, as SQLite keeps the heartbeat's time

    recovery.recover(sweep)
    recovery.recover(sweep)  # idempotent: no second retry
    trials = sweep.study.get_trials()
    assert [t.state for t in trials[:3]] == [TrialState.FAIL, TrialState.FAIL, TrialState.RUNNING]
    retries = {t.user_attrs["retry_of"]: t for t in trials[3:]}
    assert set(retries) == {here.number, elsewhere.number} and len(trials) == 5
    for lost in (here, elsewhere):
        assert retries[lost.number].state == TrialState.WAITING
        assert retries[lost.number].system_attrs["fixed_params"] == lost.params
    run = sweep.client.get_run(run_id)
    assert run.info.status == "KILLED" and run.data.tags["harness.state"] == "LOST"


def test_counting_skips_lost_trials_and_refuses_a_surplus_trial(
    tmp_path: Path, optuna_storage: str, tracking_uri: str
) -> None:
    sweep_storage.quiet_optuna()
    study = open_sweep(tmp_path, optuna_storage, tracking_uri, Heartbeat()).study
    first = bookkeeping.next_trial(study, target=2)
    assert first is not None
    study.tell(first, [0.5])
    lost = bookkeeping.next_trial(study, target=2)
    assert lost is not None
    lost.suggest_float("loss.lambda_cat", 0.5, 2.0, log=True)
    study.tell(lost, state=TrialState.FAIL)
    bookkeeping.enqueue_retry(study, study.get_trials()[lost.number])
    assert len(bookkeeping.counted(study.get_trials())) == 1

    retry = bookkeeping.next_trial(study, target=2)  # the waiting retry, with the lost trial's params
    assert retry is not None and retry.user_attrs["retry_of"] == lost.number
    assert retry.suggest_float("loss.lambda_cat", 0.5, 2.0, log=True) == lost.params["loss.lambda_cat"]
    assert bookkeeping.next_trial(study, target=2) is None  # both places taken
    study.enqueue_trial({})  # a waiting trial beyond the target, as a racing worker would create one
    assert bookkeeping.next_trial(study, target=2) is None
    surplus = study.get_trials()[-1]
    assert surplus.state == TrialState.FAIL and surplus.user_attrs["surplus"] is True
    study.tell(retry, [0.7])
    assert [t.number for t in bookkeeping.counted(study.get_trials())] == [first.number, retry.number]


def test_a_trial_below_the_median_is_pruned_at_its_evaluation(
    tmp_path: Path, optuna_storage: str, tracking_uri: str
) -> None:
    sweep_storage.quiet_optuna()
    study = open_sweep(tmp_path, optuna_storage, tracking_uri, Heartbeat()).study
    study.pruner = optuna.pruners.MedianPruner(n_startup_trials=1)
    images: dict[str, np.ndarray] = {}
    good = study.ask()
    info = RunInfo("cpu", "bundled-10k", "nowhere", 0, 0)
    reporter = ObjectiveReporter(good, ["eval/cat_acc"], "mean", report=True)
    reporter.on_start(info, [TrainConfig()])
    for step, accuracy in ((2, 0.5), (4, 0.6)):
        reporter.on_eval_round(step, [Evaluation(step, {"eval/cat_acc": accuracy}, images)])
    study.tell(good, reporter.values())

    bad = study.ask()
    reporter = ObjectiveReporter(bad, ["eval/cat_acc"], "mean", report=True)
    reporter.on_start(info, [TrainConfig()])
    reporter.on_eval_round(0, [Evaluation(0, {"eval/cat_acc": 0.01}, images)])  # the untrained baseline: not reported
    with pytest.raises(optuna.TrialPruned, match="evaluation 1"):
        reporter.on_eval_round(2, [Evaluation(2, {"eval/cat_acc": 0.1}, images)])
    assert bad.should_prune() and study.get_trials()[-1].intermediate_values == {1: 0.1}


def test_a_sweep_decides_its_data_once_and_says_so_once(tmp_path: Path, optuna_storage: str, tracking_uri: str) -> None:
    online = {**TINY_TRAIN, "data": {"download": True, "root": str(tmp_path / "data")}, "device": "cpu"}
    study_file = write_study(tmp_path, "offline", 2, LAMBDA_SEARCH, train=online)
    result = CliRunner().invoke(main, sweep_args(study_file, optuna_storage, tracking_uri))
    assert result.exit_code == 0, result.output
    said = re.findall(r"^data: (torchvision|bundled-10k) from ", result.output, flags=re.MULTILINE)
    assert len(said) == 1, result.output  # the decision, once
    assert result.output.count("could not download") <= 1 and "not found in" not in result.output
    _, children = runs_of(tracking_uri, "offline")
    assert {run.data.tags["data.source"] for run in children} == {said[0]}  # and every run records it
    assert all(run.data.params["data.download"] == "False" for run in children)  # no trial asks the network
