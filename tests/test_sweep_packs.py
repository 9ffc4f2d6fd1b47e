"""Sweeps that train trials in packs: a worker claims up to `pack` trials, trains those of one architecture as
one fused model, and ends each trial on its own, in both stores."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from click.testing import CliRunner
from optuna.trial import TrialState

from harness.cli import main
from tests.sweep_helpers import (
    TINY_TRAIN,
    WAIT_S,
    assert_nothing_running,
    counted_trials,
    runs_of,
    start_sweep,
    sweep_args,
    trials_of,
    wait_for,
    write_study,
)

GRID = {"type": "grid"}
DIVERGING_LR = 1e6  # D's weights blow up within the first steps: that trial's losses turn non-finite


def test_a_pack_trains_trials_of_one_architecture_together_and_a_diverging_one_fails_alone(
    tmp_path: Path, optuna_storage: str, tracking_uri: str
) -> None:
    """Four trials, a grid over D's learning rate (one diverging) and the batch size (two architectures),
    packs of three: of any three trials two share a batch size, and those two are one diverging and one
    sound trial, trained as one model."""
    search = {
        "optim.lr_d": {"type": "categorical", "choices": [2e-4, DIVERGING_LR]},
        "optim.batch_size": {"type": "categorical", "choices": [16, 8]},
    }
    study_file = write_study(tmp_path, "packs", 4, search, sampler=GRID)
    result = CliRunner().invoke(main, sweep_args(study_file, optuna_storage, tracking_uri, "--pack", "3"))
    assert result.exit_code == 0, result.output

    trials = trials_of(optuna_storage, "packs")
    assert len(trials) == 4 and len(counted_trials(trials)) == 4
    parent, children = runs_of(tracking_uri, "packs")
    pack_sizes = {int(run.data.tags["optuna.trial"]): int(run.data.tags["harness.pack"]) for run in children}
    # the first three claimed: two of one batch size as a pack, the third alone; then the fourth alone
    assert sorted(pack_sizes.values()) == [1, 1, 2, 2], pack_sizes
    runs = {int(run.data.tags["optuna.trial"]): run for run in children}
    for trial in trials:
        run = runs[trial.number]
        if trial.params["optim.lr_d"] == DIVERGING_LR:
            assert trial.state == TrialState.FAIL and "non-finite loss" in trial.user_attrs["error"]
            assert run.info.status == "FAILED" and run.data.tags["harness.state"] == "FAIL"
        else:  # its pack mate diverged beside it
            assert trial.state == TrialState.COMPLETE and trial.value == run.data.metrics["eval/cat_acc"]
            assert run.info.status == "FINISHED" and run.data.params["optim.batch_size"] == str(
                trial.params["optim.batch_size"]
            )
    packed = sorted(
        (n for n, size in pack_sizes.items() if size == 2), key=lambda n: trials[n].state != TrialState.FAIL
    )
    assert {trials[n].params["optim.batch_size"] for n in packed} == {trials[packed[0]].params["optim.batch_size"]}
    diverged, sound = (trials[n] for n in packed)  # the diverged one's end is recorded when it stops
    assert diverged.datetime_complete is not None and sound.datetime_complete is not None
    assert diverged.datetime_complete < sound.datetime_complete
    assert runs[diverged.number].info.end_time < runs[sound.number].info.end_time
    assert_nothing_running(trials, children, parent)


def test_the_seeds_of_packed_trials_are_members_of_one_pack(
    tmp_path: Path, optuna_storage: str, tracking_uri: str
) -> None:
    """Two trials of two seeds each, a pack of 2: four members, each seed logging to its own run."""
    search = {"loss.lambda_cat": {"type": "categorical", "choices": [0.5, 1.5]}}
    study_file = write_study(tmp_path, "packed-seeds", 2, search, sampler=GRID, repeats=2, pack=2)
    result = CliRunner().invoke(main, sweep_args(study_file, optuna_storage, tracking_uri))
    assert result.exit_code == 0, result.output

    trials = trials_of(optuna_storage, "packed-seeds")
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert all(len(t.user_attrs["seeds"]["values"]) == 2 for t in trials)
    parent, children = runs_of(tracking_uri, "packed-seeds")
    trial_runs = {run.info.run_id: run for run in children if run.data.tags.get("harness.role") != "seed"}
    seed_runs = [run for run in children if run.data.tags.get("harness.role") == "seed"]
    assert [run.data.tags["harness.pack"] for run in trial_runs.values()] == ["2", "2"]
    assert len(seed_runs) == 4 and all(run.data.tags["mlflow.parentRunId"] in trial_runs for run in seed_runs)
    assert all("eval/cat_acc" in run.data.metrics for run in seed_runs)
    for trial in trials:
        run = trial_runs[trial.user_attrs["mlflow_run_id"]]
        assert run.data.metrics["eval/cat_acc"] == pytest.approx(trial.value)
    assert_nothing_running(trials, children, parent)


@pytest.mark.slow
def test_a_stop_signal_interrupts_every_trial_of_the_pack(
    tmp_path: Path, optuna_storage: str, tracking_uri: str
) -> None:
    long = {**TINY_TRAIN, "steps": 200}  # the signal lands while the pack trains
    search = {"loss.lambda_cat": {"type": "float", "low": 0.5, "high": 2.0}}
    study_file = write_study(tmp_path, "stop-pack", 3, search, train=long, pack=2)
    log = tmp_path / "sweep.log"
    process = start_sweep(study_file, optuna_storage, tracking_uri, log)
    try:

        def both_running() -> bool:
            if not Path(tracking_uri.removeprefix("sqlite:///")).is_file():
                return False  # the MLflow store comes second: read nothing before it exists
            running = trials_of(optuna_storage, "stop-pack")
            return sum(t.state == TrialState.RUNNING and "mlflow_run_id" in t.user_attrs for t in running) == 2

        wait_for(both_running, process, log)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=WAIT_S) == 143, log.read_text()
    finally:
        process.kill()
        process.wait()

    trials = trials_of(optuna_storage, "stop-pack")
    stopped = [t for t in trials if t.state == TrialState.FAIL]
    assert len(stopped) == 2 and all(t.user_attrs["error"] == "interrupted (SIGTERM)" for t in stopped)
    retries = sorted(t.user_attrs["retry_of"] for t in trials if t.state == TrialState.WAITING)
    assert retries == sorted(t.number for t in stopped)
    parent, children = runs_of(tracking_uri, "stop-pack")
    assert all(run.data.tags["harness.state"] == "INTERRUPTED" for run in children)
    assert_nothing_running(trials, children, parent)
